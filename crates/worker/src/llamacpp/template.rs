//! The model's own chat template (`tokenizer.chat_template` in the GGUF), rendered with
//! a Jinja engine (minijinja, with Python string methods) the way Hugging Face renders
//! it: blocks trimmed, `raise_exception` refusing the messages, `add_generation_prompt`
//! set so the rendered text ends where the assistant's turn begins.

use minijinja::{Environment, ErrorKind};
use modelpool_proto::v1::{ChatMessage, Role};
use serde::Serialize;

use crate::EngineError;

const NAME: &str = "chat";

/// A compiled chat template and the special tokens it may name.
pub struct ChatTemplate {
    env: Environment<'static>,
    bos_token: String,
    eos_token: String,
}

#[derive(Serialize)]
struct Turn<'a> {
    role: &'a str,
    content: &'a str,
}

impl ChatTemplate {
    /// Compiles `source`; a template that does not parse fails the load.
    pub fn new(source: String, bos_token: String, eos_token: String) -> Result<Self, EngineError> {
        let mut env = Environment::new();
        env.set_trim_blocks(true);
        env.set_lstrip_blocks(true);
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function(
            "raise_exception",
            |message: String| -> Result<(), minijinja::Error> {
                Err(minijinja::Error::new(ErrorKind::InvalidOperation, message))
            },
        );
        env.add_template_owned(NAME, source).map_err(|e| {
            EngineError::Load(format!("the model's chat template does not parse: {e}"))
        })?;
        Ok(Self {
            env,
            bos_token,
            eos_token,
        })
    }

    /// Renders `turns` as the prompt of the assistant's next turn. A template that
    /// refuses them (roles out of order, its own `raise_exception`) is the request's
    /// fault: `INVALID_ARGUMENT` with the template's words.
    pub fn render(&self, turns: &[ChatMessage]) -> Result<String, EngineError> {
        let messages: Vec<Turn<'_>> = turns
            .iter()
            .map(|t| Turn {
                role: match t.role() {
                    Role::System => "system",
                    Role::Assistant => "assistant",
                    Role::User | Role::Unspecified => "user",
                },
                content: &t.content,
            })
            .collect();
        let template = self
            .env
            .get_template(NAME)
            .map_err(|e| EngineError::Generation(format!("chat template missing: {e}")))?;
        template
            .render(minijinja::context! {
                messages => messages,
                add_generation_prompt => true,
                bos_token => &self.bos_token,
                eos_token => &self.eos_token,
            })
            .map_err(|e| {
                let reason = match e.kind() {
                    ErrorKind::InvalidOperation => e.detail().unwrap_or("refused").to_owned(),
                    _ => e.to_string(),
                };
                EngineError::invalid(
                    "messages",
                    format!("the model's chat template refused the prompt: {reason}"),
                )
            })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const CHATML: &str = "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}{{ '<|im_start|>system\nYou are helpful.<|im_end|>\n' }}{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}";

    fn turn(role: Role, content: &str) -> ChatMessage {
        ChatMessage {
            role: role as i32,
            content: content.into(),
        }
    }

    #[test]
    fn renders_turns_and_the_generation_prompt() {
        let t = ChatTemplate::new(CHATML.into(), String::new(), "<|im_end|>".into()).unwrap();
        let out = t.render(&[turn(Role::User, "Hi")]).unwrap();
        assert_eq!(
            out,
            "<|im_start|>system\nYou are helpful.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
        );
    }

    #[test]
    fn python_string_methods_and_refusals() {
        let src = "{% if messages[0].role == 'assistant' %}{{ raise_exception('Conversations must start with a user turn') }}{% endif %}{{ messages[0].content.strip().upper() }}";
        let t = ChatTemplate::new(src.into(), String::new(), String::new()).unwrap();
        assert_eq!(t.render(&[turn(Role::User, "  hi ")]).unwrap(), "HI");
        let err = t.render(&[turn(Role::Assistant, "x")]).unwrap_err();
        assert!(matches!(
            err,
            EngineError::InvalidArgument {
                field: "messages",
                ..
            }
        ));
        assert!(
            err.to_string().contains("must start with a user turn"),
            "{err}"
        );
    }

    #[test]
    fn a_template_that_does_not_parse_fails_the_load() {
        let Err(err) = ChatTemplate::new("{% for %}".into(), String::new(), String::new()) else {
            panic!("a template that does not parse compiled");
        };
        assert!(matches!(err, EngineError::Load(_)), "{err}");
    }
}
