//! Prefix reuse in the llama.cpp engine: a request whose prompt shares a prefix with
//! what a finished request left in the model's KV cells prefills only the rest, and
//! answers exactly what it would have answered from an empty cache.

use modelpool_proto::v1::{ChatMessage, ChatRequest, EvictModelRequest, Role, Usage};
use modelpool_tests::{
    collect, greedy, model_toml, settings_toml, text_of, TestServer, SYSTEM_PROMPT,
};

const MODEL: &str = "chatty";

fn message(role: Role, content: &str) -> ChatMessage {
    ChatMessage {
        role: role.into(),
        content: content.into(),
    }
}

/// A chat of `turns` (user, assistant, user, ...) after the system prompt.
fn conversation(turns: &[&str]) -> ChatRequest {
    conversation_with(MODEL, turns)
}

/// As [`conversation`], with model `model`.
fn conversation_with(model: &str, turns: &[&str]) -> ChatRequest {
    let mut messages = vec![message(Role::System, SYSTEM_PROMPT)];
    for (i, text) in turns.iter().enumerate() {
        let role = if i % 2 == 0 {
            Role::User
        } else {
            Role::Assistant
        };
        messages.push(message(role, text));
    }
    ChatRequest {
        model: model.into(),
        messages,
        sampling: Some(greedy(24)),
    }
}

/// The answer and its usage.
async fn turn(t: &TestServer, request: ChatRequest) -> (String, Usage) {
    let stream = t
        .inference()
        .chat(request)
        .await
        .expect("chat starts")
        .into_inner();
    let chunks = collect(stream).await.expect("chat completes");
    let usage = chunks.last().and_then(|c| c.usage).expect("usage");
    (text_of(&chunks), usage)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chat_turns_reuse_the_kv_of_earlier_turns() {
    let t = TestServer::start_with(|runtime| {
        let extra = "engine = \"llama.cpp\"\ncontext_length = 1024\nmax_sequences = 3\n";
        settings_toml("", &model_toml(MODEL, extra), runtime)
    })
    .await;
    let first_question = "Tell me three facts about the sea.";
    let (first_answer, first) = turn(&t, conversation(&[first_question])).await;
    assert_eq!(first.cached_tokens, 0, "nothing was cached yet: {first:?}");

    // The next turn resends the first with its answer: its prompt starts with the
    // first turn's whole prompt, which the first turn's cells still hold.
    let second = [first_question, &first_answer, "And three about mountains?"];
    let (answer, usage) = turn(&t, conversation(&second)).await;
    assert!(
        usage.cached_tokens >= first.prompt_tokens - 1 && usage.cached_tokens < usage.prompt_tokens,
        "turn 2 reused {} of its {} prompt tokens; turn 1's prompt was {}",
        usage.cached_tokens,
        usage.prompt_tokens,
        first.prompt_tokens
    );
    // The same request again: all of it is cached, its first token is sampled from
    // the logits its prompt left, and it reads the cells it read before: the answer
    // is the same.
    let (again, same) = turn(&t, conversation(&second)).await;
    assert_eq!(same.cached_tokens, same.prompt_tokens, "{same:?}");
    assert_eq!(again, answer, "an exact prefix changed the answer");
    // A turn that diverges from the cached one after the first exchange reuses what
    // they share.
    let diverging = [first_question, &first_answer, "Which sea is the saltiest?"];
    let (_, partial) = turn(&t, conversation(&diverging)).await;
    assert!(
        partial.cached_tokens > first.prompt_tokens / 2
            && partial.cached_tokens < partial.prompt_tokens - 1,
        "{partial:?}"
    );
    // A second conversation takes a slot nobody's cells are in (the two turns above
    // hold two), sharing only the system prompt's cells; the first conversation's
    // cells stay whole.
    let (_, other) = turn(&t, conversation(&["Name a colour."])).await;
    assert!(
        other.cached_tokens > 0 && other.cached_tokens < other.prompt_tokens - 4,
        "{other:?}"
    );
    let (_, back) = turn(&t, conversation(&diverging)).await;
    assert_eq!(back.cached_tokens, back.prompt_tokens, "{back:?}");
    // GetModel shows the conversations kept (no spill directory: nothing saved). The
    // last answer's slot is freed just after its final chunk went out: wait for it.
    let mut kept = None;
    for _ in 0..250 {
        let now = t
            .model(MODEL)
            .await
            .prefixes
            .expect("a ready llama.cpp model");
        let done = now.kept == 3;
        kept = Some(now);
        if done {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    let kept = kept.expect("read at least once");
    assert_eq!(kept.kept, 3, "{kept:?}");
    assert_eq!(
        (kept.saved, kept.saved_bytes, kept.restored_total),
        (0, 0, 0)
    );
    assert!(kept.reused_prompt_tokens_total >= u64::from(back.cached_tokens));

    // A fresh worker has nothing cached.
    t.control()
        .evict_model(EvictModelRequest { id: MODEL.into() })
        .await
        .expect("evicts");
    let (_, cold) = turn(&t, conversation(&diverging)).await;
    assert_eq!(cold.cached_tokens, 0, "{cold:?}");
    t.stop().await;
}

/// The saved-prefix files under `spill`, sorted.
fn saved_files(spill: &std::path::Path) -> Vec<std::path::PathBuf> {
    let root = spill.join(modelpool_pool::store::SAVED_PREFIXES_DIR);
    let mut files: Vec<_> = std::fs::read_dir(&root)
        .into_iter()
        .flatten()
        .flatten()
        .flat_map(|setting| {
            std::fs::read_dir(setting.path())
                .into_iter()
                .flatten()
                .flatten()
        })
        .map(|e| e.path())
        .collect();
    files.sort();
    files
}

async fn evict(t: &TestServer) {
    evict_id(t, MODEL).await;
}

async fn evict_id(t: &TestServer, id: &str) {
    t.control()
        .evict_model(EvictModelRequest { id: id.into() })
        .await
        .expect("evicts");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_conversation_survives_eviction_through_its_saved_prefix() {
    let spill = tempfile::tempdir().expect("tempdir");
    let storage = format!("[storage]\nspill_dir = \"{}\"\n", spill.path().display());
    let t = TestServer::start_with(|runtime| {
        let extra = "engine = \"llama.cpp\"\ncontext_length = 1024\nmax_sequences = 2\n";
        settings_toml(&storage, &model_toml(MODEL, extra), runtime)
    })
    .await;
    let question = "Tell me three facts about the sea.";
    // The conversation with its model resident throughout: turn 2 reads turn 1's cells.
    let (first_answer, first) = turn(&t, conversation(&[question])).await;
    let second = [question, &first_answer, "And three about mountains?"];
    let (resident_answer, resident) = turn(&t, conversation(&second)).await;
    assert!(
        resident.cached_tokens >= first.prompt_tokens - 1,
        "{resident:?}"
    );
    evict(&t).await;
    for f in saved_files(spill.path()) {
        std::fs::remove_file(f).unwrap();
    }

    // The same conversation with an eviction between the turns: turn 1's state is
    // saved as the worker stops and restored after the reload, so turn 2 reads the
    // same cells and answers exactly as it did resident.
    let (again, _) = turn(&t, conversation(&[question])).await;
    assert_eq!(
        again, first_answer,
        "greedy turn 1 repeats on a fresh worker"
    );
    evict(&t).await;
    let files = saved_files(spill.path());
    assert_eq!(
        files.len(),
        1,
        "one kept prefix saved at eviction: {files:?}"
    );
    let (answer, usage) = turn(&t, conversation(&second)).await;
    assert!(usage.cold_start, "{usage:?}");
    assert_eq!(
        usage.cached_tokens, resident.cached_tokens,
        "turn 2 after a reload reused what it reused resident: {usage:?}"
    );
    assert_eq!(
        answer, resident_answer,
        "a restored prefix changed the answer"
    );
    // GetModel shows what the worker keeps and what is saved.
    let prefixes = t
        .model(MODEL)
        .await
        .prefixes
        .expect("a ready llama.cpp model");
    assert_eq!(prefixes.restored_total, 1, "{prefixes:?}");
    assert!(prefixes.reused_prompt_tokens_total >= u64::from(usage.cached_tokens));
    assert_eq!(prefixes.kept, 1, "{prefixes:?}");
    assert!(
        prefixes.kept_tokens > u64::from(usage.prompt_tokens),
        "{prefixes:?}"
    );
    assert_eq!(prefixes.saved, 1, "{prefixes:?}");
    let on_disk = std::fs::metadata(&files[0]).unwrap().len();
    assert_eq!(prefixes.saved_bytes, on_disk, "{prefixes:?}");

    // A truncated file is never loaded: it is deleted and the turn prefills in full.
    evict(&t).await;
    for f in saved_files(spill.path()) {
        let bytes = std::fs::read(&f).unwrap();
        std::fs::write(&f, &bytes[..bytes.len() / 2]).unwrap();
    }
    let files = saved_files(spill.path());
    assert!(!files.is_empty(), "the last turn was saved too");
    let (_, refused) = turn(&t, conversation(&second)).await;
    assert_eq!(refused.cached_tokens, 0, "{refused:?}");
    let left = saved_files(spill.path());
    assert!(
        files.iter().all(|f| !left.contains(f)),
        "truncated files deleted: {left:?}"
    );

    // A server that stops saves what its workers keep; the next one restores it.
    t.stop().await;
    let t = TestServer::start_with(|runtime| {
        let extra = "engine = \"llama.cpp\"\ncontext_length = 1024\nmax_sequences = 2\n";
        settings_toml(&storage, &model_toml(MODEL, extra), runtime)
    })
    .await;
    // (The logits of the prompt's last token are not saved: it is decoded again.)
    let (after_restart, restarted) = turn(&t, conversation(&second)).await;
    assert_eq!(
        restarted.cached_tokens,
        restarted.prompt_tokens - 1,
        "{restarted:?}"
    );
    assert!(!after_restart.is_empty());
    t.stop().await;
}

/// `prefix_cache = false`: every prompt is prefilled from its first token, a repeat
/// included, nothing is kept in the cells or saved at eviction, and the answers are the
/// ones the cache gives (greedy).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_the_prefix_cache_off_nothing_is_reused_kept_or_saved() {
    let spill = tempfile::tempdir().expect("tempdir");
    let storage = format!("[storage]\nspill_dir = \"{}\"\n", spill.path().display());
    let t = TestServer::start_with(|runtime| {
        let extra =
            "engine = \"llama.cpp\"\ncontext_length = 1024\nmax_sequences = 2\nprefix_cache = false\n";
        settings_toml(&storage, &model_toml(MODEL, extra), runtime)
    })
    .await;
    let question = "Tell me three facts about the sea.";
    let (first_answer, first) = turn(&t, conversation(&[question])).await;
    let (again_answer, again) = turn(&t, conversation(&[question])).await;
    assert_eq!((first.cached_tokens, again.cached_tokens), (0, 0));
    assert_eq!(again_answer, first_answer, "greedy answers stay the same");
    let second = [
        question,
        first_answer.as_str(),
        "And three about mountains?",
    ];
    let (_, longer) = turn(&t, conversation(&second)).await;
    assert_eq!(longer.cached_tokens, 0, "{longer:?}");
    let prefixes = t
        .model(MODEL)
        .await
        .prefixes
        .expect("a ready llama.cpp model");
    assert_eq!(
        (prefixes.kept, prefixes.reused_prompt_tokens_total),
        (0, 0),
        "{prefixes:?}"
    );
    evict(&t).await;
    assert!(
        saved_files(spill.path()).is_empty(),
        "{:?}",
        saved_files(spill.path())
    );
    let (_, reloaded) = turn(&t, conversation(&second)).await;
    assert_eq!(reloaded.cached_tokens, 0, "{reloaded:?}");
    t.stop().await;
}

/// The saved prefixes of every model share one `saved_prefix_budget`: the server drops
/// the least recently used, at start-up and after each save, across settings.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_models_saved_prefixes_share_one_budget() {
    let spill = tempfile::tempdir().expect("tempdir");
    // One file under two context lengths: two settings, two directories.
    let models = model_toml("one", "engine = \"llama.cpp\"\ncontext_length = 1024\n")
        + &model_toml("two", "engine = \"llama.cpp\"\ncontext_length = 2048\n");
    let start = |budget: String| {
        let storage = format!(
            "[storage]\nspill_dir = \"{}\"\nsaved_prefix_budget = \"{budget}\"\n",
            spill.path().display()
        );
        let models = models.clone();
        TestServer::start_with(move |runtime| settings_toml(&storage, &models, runtime))
    };
    let question = "Tell me three facts about the sea.";
    let t = start("64MiB".into()).await;
    for id in ["one", "two"] {
        turn(&t, conversation_with(id, &[question])).await;
        evict_id(&t, id).await;
    }
    let mut files = saved_files(spill.path());
    assert_eq!(files.len(), 2, "{files:?}");
    let used = |p: &std::path::PathBuf| std::fs::metadata(p).and_then(|m| m.modified()).unwrap();
    files.sort_by_key(used);
    let (one, two) = (files[0].clone(), files[1].clone());
    let size = |p: &std::path::PathBuf| std::fs::metadata(p).map_or(0, |m| m.len());
    t.stop().await;

    // Room for the larger one only: at start-up the older (`one`'s) goes.
    let budget = size(&one).max(size(&two)) + 1024;
    let t = start(budget.to_string()).await;
    assert_eq!(saved_files(spill.path()), vec![two.clone()]);
    // A new save of `one` makes `two`'s the least recently used: it goes.
    turn(&t, conversation_with("one", &[question])).await;
    evict_id(&t, "one").await;
    let now = saved_files(spill.path());
    assert_eq!(now.len(), 1, "{now:?}");
    assert_eq!(now[0].parent(), one.parent(), "{now:?}");
    t.stop().await;
}
