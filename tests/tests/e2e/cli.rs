//! The client subcommands of `modelpool`, run as a user runs them: the real binary as a
//! child process against an in-process server with the real model, its output read the
//! way a person or a script would read it. Children run on tokio's process API, so the
//! server in this process keeps serving while a test waits for them.

use std::path::Path;
use std::process::{Output, Stdio};
use std::time::Duration;

use modelpool_tests::{
    model_path, model_toml, modelpool_exe, predicted_bytes, OneFileFootprint, TestServer,
};
use serde_json::Value;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::process::Command;

/// Longest any one command may take (a cold load plus an answer on a busy 2-core box).
const LIMIT: Duration = Duration::from_secs(180);

/// `modelpool ARGS` with a clean environment: no address, config or log filter leaks in.
fn command(args: &[&str]) -> Command {
    let mut c = Command::new(modelpool_exe());
    c.args(args)
        .env_remove("MODELPOOL_ADDR")
        .env_remove("MODELPOOL_CONFIG")
        .env_remove("RUST_LOG")
        .stdin(Stdio::null())
        .kill_on_drop(true);
    c
}

async fn output(mut c: Command) -> Output {
    tokio::time::timeout(LIMIT, c.output())
        .await
        .expect("modelpool finishes in time")
        .expect("modelpool runs")
}

/// The server's address as people type it: no scheme.
fn addr(t: &TestServer) -> String {
    t.server.local_addr.to_string()
}

/// A client command against the test server.
async fn cli(t: &TestServer, args: &[&str]) -> Output {
    let addr = addr(t);
    let mut all = args.to_vec();
    all.extend(["--addr", addr.as_str()]);
    output(command(&all)).await
}

fn stdout(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

fn succeeded(args: &[&str], out: &Output) -> String {
    assert!(
        out.status.success(),
        "modelpool {args:?} failed with {}\nstdout: {}\nstderr: {}",
        out.status,
        stdout(out),
        stderr(out)
    );
    stdout(out)
}

/// A client command that must succeed; its stdout.
async fn ok(t: &TestServer, args: &[&str]) -> String {
    succeeded(args, &cli(t, args).await)
}

/// A client command with `--json`; its one JSON document.
async fn json(t: &TestServer, args: &[&str]) -> Value {
    let mut all = args.to_vec();
    all.push("--json");
    let text = ok(t, &all).await;
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{all:?} printed no JSON ({e}): {text}"))
}

fn model<'a>(doc: &'a Value, id: &str) -> &'a Value {
    doc["models"]
        .as_array()
        .expect("a models array")
        .iter()
        .find(|m| m["id"] == id)
        .unwrap_or_else(|| panic!("no model {id} in {doc}"))
}

fn has_model(doc: &Value, id: &str) -> bool {
    doc["models"]
        .as_array()
        .expect("a models array")
        .iter()
        .any(|m| m["id"] == id)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn operator_commands_drive_the_pool() {
    let t = TestServer::start(&["smollm2"]).await;

    let list = json(&t, &["models"]).await;
    let m = model(&list, "smollm2");
    assert_eq!(m["state"], "registered", "{m}");
    assert_eq!(m["resident"], false);
    let table = ok(&t, &["models"]).await;
    let mut rows = table.lines();
    assert!(rows.next().unwrap_or("").starts_with("ID "), "{table}");
    let row = rows.next().unwrap_or("");
    assert!(
        row.starts_with("smollm2 ") && row.contains("registered") && row.contains("never"),
        "{table}"
    );

    let loaded = ok(&t, &["load", "smollm2"]).await;
    assert!(
        loaded.starts_with("loaded smollm2 in ") && loaded.contains(" s (worker pid "),
        "{loaded}"
    );
    let again = ok(&t, &["load", "smollm2"]).await;
    assert!(again.starts_with("smollm2 was resident already"), "{again}");

    let status = json(&t, &["status"]).await;
    let cpu = &status["devices"][0];
    assert_eq!(cpu["device"], "cpu", "{status}");
    assert!(cpu["used_bytes"].as_u64().unwrap_or(0) > 0, "{status}");
    assert!(cpu["budget_bytes"].as_u64().unwrap_or(0) >= cpu["used_bytes"].as_u64().unwrap_or(0));
    let m = model(&status, "smollm2");
    assert_eq!(m["state"], "ready", "{m}");
    assert!(m["worker_pid"].as_u64().unwrap_or(0) > 0, "{m}");
    assert!(
        m["load_measured_bytes"].as_u64().unwrap_or(0) > 50 << 20,
        "{m}"
    );
    let human = ok(&t, &["status"]).await;
    let bar = human.lines().find(|l| l.starts_with("cpu")).unwrap_or("");
    assert!(bar.contains("host RAM") && bar.contains("[#"), "{human}");
    assert!(
        bar.contains("] used ") && bar.contains(" of budget "),
        "{human}"
    );
    assert!(
        human
            .lines()
            .any(|l| l.starts_with("smollm2 ") && l.contains("ready")),
        "{human}"
    );

    // Pinning shows in the list and stops an eviction.
    assert_eq!(ok(&t, &["pin", "smollm2"]).await.trim(), "pinned smollm2");
    assert_eq!(
        model(&json(&t, &["models"]).await, "smollm2")["pinned"],
        true
    );
    let refused = cli(&t, &["evict", "smollm2"]).await;
    assert_eq!(refused.status.code(), Some(1), "{}", stderr(&refused));
    assert!(
        stderr(&refused).starts_with("modelpool: FAILED_PRECONDITION: "),
        "{}",
        stderr(&refused)
    );
    let unpinned = json(&t, &["unpin", "smollm2"]).await;
    assert_eq!(
        (&unpinned["id"], &unpinned["pinned"]),
        (&"smollm2".into(), &false.into())
    );
    assert_eq!(
        model(&json(&t, &["models"]).await, "smollm2")["pinned"],
        false
    );

    assert_eq!(
        ok(&t, &["evict", "smollm2"]).await.trim(),
        "evicted smollm2"
    );
    let m = model(&json(&t, &["models"]).await, "smollm2").clone();
    assert_eq!(
        (&m["state"], &m["resident"]),
        (&"registered".into(), &false.into()),
        "{m}"
    );
    assert_eq!(m["resident_bytes"], 0, "{m}");
    assert_eq!(
        ok(&t, &["evict", "smollm2"]).await.trim(),
        "smollm2 was not resident"
    );

    let missing = cli(&t, &["evict", "nope"]).await;
    assert_eq!(missing.status.code(), Some(1));
    assert!(
        stderr(&missing).starts_with("modelpool: NOT_FOUND: "),
        "{}",
        stderr(&missing)
    );
    assert!(stdout(&missing).is_empty());

    // A relative --path is taken from the client's current directory.
    let file = model_path();
    let (dir, name) = (
        file.parent().expect("models dir"),
        file.file_name().expect("file name"),
    );
    let name = name.to_str().expect("UTF-8 name");
    let addr = addr(&t);
    let args = [
        "register",
        "--id",
        "copy",
        "--path",
        name,
        "--context-length",
        "512",
        "--idle-ttl",
        "10m",
        "--json",
        "--addr",
        &addr,
    ];
    let mut register = command(&args);
    register.current_dir(dir);
    let registered: Value = serde_json::from_str(&succeeded(&args, &output(register).await))
        .expect("register prints JSON");
    assert_eq!(
        registered["source"],
        file.display().to_string(),
        "{registered}"
    );
    assert_eq!(
        (&registered["context_length"], &registered["idle_ttl_s"]),
        (&512.into(), &600.0.into())
    );
    assert!(has_model(&json(&t, &["models"]).await, "copy"));
    let dup = cli(
        &t,
        &[
            "register",
            "--id",
            "copy",
            "--path",
            &file.display().to_string(),
        ],
    )
    .await;
    assert!(
        stderr(&dup).starts_with("modelpool: ALREADY_EXISTS: "),
        "{}",
        stderr(&dup)
    );
    assert_eq!(
        ok(&t, &["unregister", "copy"]).await.trim(),
        "unregistered copy"
    );
    assert!(!has_model(&json(&t, &["models"]).await, "copy"));
    t.stop().await;
}

/// Runs `chat` with `input` on its stdin; its output.
async fn chat_with_stdin(t: &TestServer, args: &[&str], input: &str) -> Output {
    let addr = addr(t);
    let mut all = vec!["chat", "smollm2"];
    all.extend(args);
    all.extend(["--addr", addr.as_str()]);
    let mut child = command(&all)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("modelpool chat starts");
    let mut stdin = child.stdin.take().expect("stdin is piped");
    stdin
        .write_all(input.as_bytes())
        .await
        .expect("write the turns");
    drop(stdin); // EOF
    tokio::time::timeout(LIMIT, child.wait_with_output())
        .await
        .expect("chat finishes in time")
        .expect("chat runs")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chat_answers_a_prompt_and_a_conversation() {
    let t = TestServer::start(&["smollm2"]).await;
    let answer = ok(
        &t,
        &[
            "chat",
            "smollm2",
            "What is the capital of France?",
            "--max-tokens",
            "48",
        ],
    )
    .await;
    assert!(answer.contains("Paris"), "{answer:?}");
    assert!(answer.ends_with('\n'), "{answer:?}");

    // Two turns on stdin, then EOF: both answered, the second with the first in its
    // prompt (its prompt holds more tokens than the whole first exchange).
    let input = "What is the capital of France?\nAnd what is the capital of Italy?\n";
    let out = chat_with_stdin(&t, &["--json", "--max-tokens", "32"], input).await;
    let text = succeeded(&["chat", "smollm2", "--json"], &out);
    let lines: Vec<Value> = text
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not a JSON line ({e}): {l}")))
        .collect();
    let turn = |n: u64| -> Vec<&Value> { lines.iter().filter(|l| l["turn"] == n).collect() };
    let answer = |n: u64| -> String { turn(n).iter().filter_map(|l| l["text"].as_str()).collect() };
    assert!(answer(1).contains("Paris"), "{text}");
    assert!(!answer(2).trim().is_empty(), "{text}");
    assert!(turn(3).is_empty(), "{text}");
    let usage = |n: u64| -> Value {
        turn(n)
            .last()
            .map(|l| l["usage"].clone())
            .unwrap_or_default()
    };
    let (u1, u2) = (usage(1), usage(2));
    let tokens = |u: &Value, k: &str| u[k].as_u64().unwrap_or_else(|| panic!("no {k} in {u}"));
    assert!(
        tokens(&u2, "prompt_tokens")
            > tokens(&u1, "prompt_tokens") + tokens(&u1, "completion_tokens"),
        "the second turn did not carry the first: {u1} then {u2}"
    );

    // Plain text, and `/exit` ends the conversation before the next line.
    let out = chat_with_stdin(
        &t,
        &["--max-tokens", "24"],
        "What is the capital of France?\n/exit\n",
    )
    .await;
    let text = succeeded(&["chat", "smollm2"], &out);
    assert!(text.contains("Paris"), "{text:?}");
    assert!(text.ends_with('\n'), "{text:?}");
    t.stop().await;
}

/// Reads lines from `lines` until `want` accepts one; panics after `limit`.
async fn wait_for_line<R: tokio::io::AsyncBufRead + Unpin>(
    lines: &mut tokio::io::Lines<R>,
    limit: Duration,
    mut want: impl FnMut(&str) -> bool,
) -> String {
    let mut seen = Vec::new();
    let found = tokio::time::timeout(limit, async {
        while let Some(line) = lines.next_line().await.expect("read the output") {
            if want(&line) {
                return Some(line);
            }
            seen.push(line);
        }
        None
    })
    .await;
    match found {
        Ok(Some(line)) => line,
        Ok(None) => panic!("the output ended first; it was: {seen:?}"),
        Err(_) => panic!("no such line within {limit:?}; got: {seen:?}"),
    }
}

/// Starts `watch` and waits until it has subscribed (it says so on stderr).
async fn start_watch(
    t: &TestServer,
    json: bool,
) -> (
    tokio::process::Child,
    tokio::io::Lines<BufReader<tokio::process::ChildStdout>>,
) {
    let addr = addr(t);
    let mut args = vec!["watch", "--addr", addr.as_str()];
    if json {
        args.push("--json");
    }
    let mut child = command(&args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("modelpool watch starts");
    let mut err = BufReader::new(child.stderr.take().expect("stderr is piped")).lines();
    let ready = wait_for_line(&mut err, LIMIT, |_| true).await;
    assert!(
        ready.starts_with("watching pool events at http://"),
        "{ready}"
    );
    let out = BufReader::new(child.stdout.take().expect("stdout is piped")).lines();
    (child, out)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watch_prints_events_as_they_happen() {
    let t = TestServer::start(&["smollm2"]).await;
    let (mut json_watch, mut json_lines) = start_watch(&t, true).await;
    let (mut text_watch, mut text_lines) = start_watch(&t, false).await;

    ok(&t, &["load", "smollm2"]).await;
    let mut events = Vec::new();
    let line = wait_for_line(&mut json_lines, LIMIT, |l| {
        let v: Value =
            serde_json::from_str(l).unwrap_or_else(|e| panic!("not a JSON line ({e}): {l}"));
        let done = v["event"] == "load_finished";
        events.push(v);
        done
    })
    .await;
    let finished: Value = serde_json::from_str(&line).expect("JSON");
    assert_eq!(finished["model"], "smollm2", "{finished}");
    assert!(
        finished["measured_bytes"].as_u64().unwrap_or(0) > 0,
        "{finished}"
    );
    assert!(
        finished["duration_s"].as_f64().unwrap_or(0.0) > 0.0,
        "{finished}"
    );
    assert!(
        events
            .iter()
            .any(|e| e["event"] == "load_started" && e["model"] == "smollm2"),
        "{events:?}"
    );
    let line = wait_for_line(&mut text_lines, LIMIT, |l| l.contains("load_finished")).await;
    assert!(
        line.contains(" load_finished smollm2 ") && line.contains(" measured "),
        "{line}"
    );
    assert!(
        line.as_bytes().get(2) == Some(&b':') && line.as_bytes().get(5) == Some(&b':'),
        "{line}"
    );

    ok(&t, &["evict", "smollm2"]).await;
    let line = wait_for_line(&mut text_lines, LIMIT, |l| l.contains(" evicted ")).await;
    assert!(
        line.contains(" evicted smollm2 (requested) freed "),
        "{line}"
    );

    for child in [&mut json_watch, &mut text_watch] {
        assert!(
            child.try_wait().expect("poll watch").is_none(),
            "watch exited early"
        );
        child.kill().await.expect("stop watch");
    }
    t.stop().await;
}

fn write_plan_config(dir: &Path, budget: u64) -> std::path::PathBuf {
    let model = "context_length = 1024\nmax_sequences = 1\n";
    let toml = format!(
        "[pool]\nram_budget = \"{budget}\"\n{}{}",
        model_toml("a", model),
        model_toml("b", model)
    );
    let path = dir.join(format!("plan-{budget}.toml"));
    std::fs::write(&path, toml).expect("write the config");
    path
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plan_says_what_fits_without_a_server() {
    let _serial = modelpool_tests::serial().await;
    let dir = tempfile::tempdir().expect("tempdir");
    // a and b map one file: its pages are charged once, each its own bytes.
    let fp = OneFileFootprint::predict(1024);
    let one = predicted_bytes(1024);
    assert_eq!(fp.bytes_for(1.0), one);
    // Room for one and a half: one model fits, not both.
    let budget = fp.bytes_for(1.5);
    let config = write_plan_config(dir.path(), budget);
    let config = config.to_str().expect("UTF-8 path");

    let args = ["plan", "--config", config];
    let text = succeeded(&args, &output(command(&args)).await);
    for want in [
        "not all models fit together: cpu needs ",
        "fits together (pinned first, then config order): a\n",
        "left out: b\n",
        "largest model: a (",
        "with b resident, loading it evicts b",
    ] {
        assert!(text.contains(want), "no {want:?} in:\n{text}");
    }
    let row = text.lines().find(|l| l.starts_with("a ")).unwrap_or("");
    assert!(row.ends_with(" 1"), "one copy of a fits alone: {text}");

    let args = ["plan", "--config", config, "--json"];
    let plan: Value =
        serde_json::from_str(&succeeded(&args, &output(command(&args)).await)).expect("plan JSON");
    assert_eq!(plan["all_fit"], false, "{plan}");
    assert_eq!(plan["fits"], serde_json::json!(["a"]), "{plan}");
    assert_eq!(plan["left_out"], serde_json::json!(["b"]), "{plan}");
    assert_eq!(plan["devices"][0]["budget_bytes"], budget, "{plan}");
    assert_eq!(
        plan["devices"][0]["needed_bytes"],
        fp.bytes_for(2.0),
        "{plan}"
    );
    for m in plan["models"].as_array().expect("models") {
        assert_eq!(m["predicted"]["total_bytes"], one, "{m}");
        assert_eq!(m["copies_alone"], 1, "{m}");
    }
    assert_eq!(plan["largest"]["id"], "a", "{plan}");
    assert_eq!(
        plan["largest"]["evicts"],
        serde_json::json!(["b"]),
        "{plan}"
    );

    // Room for two and a half: both fit, two copies of each alone.
    let config = write_plan_config(dir.path(), fp.bytes_for(2.5));
    let config = config.to_str().expect("UTF-8 path");
    let mut c = command(&["plan", "--json"]);
    c.env("MODELPOOL_CONFIG", config); // the same variable as `serve`
    let plan: Value =
        serde_json::from_str(&succeeded(&["plan"], &output(c).await)).expect("plan JSON");
    assert_eq!(plan["all_fit"], true, "{plan}");
    assert_eq!(plan["fits"], serde_json::json!(["a", "b"]), "{plan}");
    assert_eq!(plan["models"][1]["copies_alone"], 2, "{plan}");
    assert_eq!(plan["largest"]["evicts"], serde_json::json!([]), "{plan}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreachable_server_is_named_and_exits_1() {
    let _serial = modelpool_tests::serial().await;
    // A port bound here and never listened on: it refuses connections, and no other
    // process can take it while the test runs.
    let (_socket, refusing) = modelpool_tests::refusing_addr();
    let addr = refusing.to_string();
    let out = output(command(&["models", "--addr", &addr])).await;
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    let err = stderr(&out);
    assert!(
        err.starts_with("modelpool: cannot reach the modelpool server at http://"),
        "{err}"
    );
    assert!(err.contains(&addr), "{err}");
    assert!(!err.contains("panicked"), "{err}");

    // The same address from the environment, for a streaming command.
    let mut c = command(&["chat", "smollm2", "Hi"]);
    c.env("MODELPOOL_ADDR", format!("http://{addr}"));
    let out = output(c).await;
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    assert!(stderr(&out).contains(&addr), "{}", stderr(&out));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plan_shows_the_precision_a_quantized_at_load_model_would_get() {
    let _serial = modelpool_tests::serial().await;
    let st = modelpool_tests::safetensors_model_dir();
    let predicted = |p: &str| modelpool_tests::predicted_safetensors_bytes(&st, 1024, p);
    let (native, q8) = (predicted("none"), predicted("q8_0"));
    let dir = tempfile::tempdir().expect("tempdir");
    let config = dir.path().join("plan.toml");
    std::fs::write(
        &config,
        format!(
            "[pool]\nram_budget = \"{}\"\n[[models]]\nid = \"st\"\npath = \"{}\"\ncontext_length = 1024\nprecisions = [\"none\", \"q8_0\"]\n",
            (native + q8) / 2,
            st.display()
        ),
    )
    .expect("write the config");
    let config = config.to_str().expect("UTF-8 path");
    let args = ["plan", "--config", config, "--json"];
    let plan: Value =
        serde_json::from_str(&succeeded(&args, &output(command(&args)).await)).expect("plan JSON");
    assert_eq!(plan["models"][0]["precision"], "q8_0", "{plan}");
    assert_eq!(plan["models"][0]["predicted"]["total_bytes"], q8, "{plan}");
    let args = ["plan", "--config", config];
    let text = succeeded(&args, &output(command(&args)).await);
    let row = text.lines().find(|l| l.starts_with("st ")).unwrap_or("");
    assert!(row.contains("cpu q8_0"), "{text}");
}
