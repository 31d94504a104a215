//! Bearer tokens: inference and control each need theirs; health stays open.

use modelpool_proto::v1::ListModelsRequest;
use modelpool_tests::{chat, collect, greedy, model_toml, settings_toml, TestServer};
use tonic::{Code, Request};

const INFERENCE: &str = "inference-token-0123456789";
const CONTROL: &str = "control-token-0123456789ab";

fn code<T>(r: Result<tonic::Response<T>, tonic::Status>) -> Option<Code> {
    r.err().map(|s| s.code())
}

fn with_token<T>(message: T, token: Option<&str>) -> Request<T> {
    let mut r = Request::new(message);
    if let Some(t) = token {
        r.metadata_mut()
            .insert("authorization", format!("Bearer {t}").parse().unwrap());
    }
    r
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokens_separate_inference_from_control() {
    let models = model_toml("m", "context_length = 1024\n");
    let t = TestServer::start_with(|runtime| {
        let mut s = settings_toml("", &models, runtime);
        let auth =
            format!("[auth]\ninference_token = \"{INFERENCE}\"\ncontrol_token = \"{CONTROL}\"\n");
        s.auth = modelpool_server::Settings::from_toml(&auth, std::path::Path::new("/"))
            .unwrap()
            .auth;
        s
    })
    .await;

    // Inference: refused without a token or with a wrong one, served with either token.
    let ask = |token| with_token(chat("m", "Hi", greedy(4)), token);
    assert_eq!(
        code(t.inference().chat(ask(None)).await),
        Some(Code::Unauthenticated)
    );
    assert_eq!(
        code(
            t.inference()
                .chat(ask(Some("wrong-token-0123456789")))
                .await
        ),
        Some(Code::Unauthenticated)
    );
    let stream = t
        .inference()
        .chat(ask(Some(INFERENCE)))
        .await
        .unwrap()
        .into_inner();
    assert!(collect(stream)
        .await
        .unwrap()
        .last()
        .unwrap()
        .usage
        .is_some());
    let stream = t
        .inference()
        .chat(ask(Some(CONTROL)))
        .await
        .unwrap()
        .into_inner();
    collect(stream).await.unwrap();

    // Control: only the control token.
    let list = |token| with_token(ListModelsRequest {}, token);
    assert_eq!(
        code(t.control().list_models(list(None)).await),
        Some(Code::Unauthenticated)
    );
    assert_eq!(
        code(t.control().list_models(list(Some(INFERENCE))).await),
        Some(Code::PermissionDenied)
    );
    let models = t
        .control()
        .list_models(list(Some(CONTROL)))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(models.models.len(), 1);

    // Health needs none (probes carry no token).
    let mut health = tonic_health::pb::health_client::HealthClient::new(t.channel.clone());
    let status = health
        .check(tonic_health::pb::HealthCheckRequest {
            service: "modelpool.v1.Inference".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        status.status,
        tonic_health::pb::health_check_response::ServingStatus::Serving as i32
    );
    t.stop().await;
}

#[test]
fn short_tokens_are_refused_without_showing_them() {
    let err = modelpool_server::Settings::from_toml(
        "[auth]\ncontrol_token = \"hunter2\"\n",
        std::path::Path::new("/"),
    )
    .unwrap_err()
    .to_string();
    assert!(err.contains("auth.control_token"), "{err}");
    assert!(!err.contains("hunter2"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cli_sends_its_token() {
    let models = model_toml("m", "context_length = 1024\n");
    let t = TestServer::start_with(|runtime| {
        let mut s = settings_toml("", &models, runtime);
        let auth = format!("[auth]\ncontrol_token = \"{CONTROL}\"\n");
        s.auth = modelpool_server::Settings::from_toml(&auth, std::path::Path::new("/"))
            .unwrap()
            .auth;
        s
    })
    .await;
    let addr = format!("http://{}", t.server.local_addr);
    let run = |token: Option<&'static str>| {
        let addr = addr.clone();
        tokio::task::spawn_blocking(move || {
            let mut cmd = std::process::Command::new(modelpool_tests::modelpool_exe());
            cmd.args(["models", "--json", "--addr", &addr])
                .env_remove("MODELPOOL_TOKEN");
            if let Some(t) = token {
                cmd.env("MODELPOOL_TOKEN", t);
            }
            cmd.output().unwrap()
        })
    };
    let refused = run(None).await.unwrap();
    assert_eq!(refused.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&refused.stderr).contains("UNAUTHENTICATED"));
    let ok = run(Some(CONTROL)).await.unwrap();
    assert!(
        ok.status.success(),
        "{}",
        String::from_utf8_lossy(&ok.stderr)
    );
    assert!(String::from_utf8_lossy(&ok.stdout).contains("\"m\""));
    t.stop().await;
}
