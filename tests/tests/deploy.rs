//! deploy/: the Kustomize base and overlays render with kubectl, validate against the
//! Kubernetes schemas (kubernetes-validate, pinned), wire what the sidecar relies on,
//! and carry modelpool configurations that modelpool itself accepts.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use modelpool_server::Settings;
use modelpool_tests::repo_root;

/// Kubernetes version the manifests are validated against.
const KUBERNETES_VERSION: &str = "1.31.0";

fn kubectl() -> PathBuf {
    let fetched = repo_root().join(".tools/kubectl");
    if fetched.is_file() {
        return fetched;
    }
    PathBuf::from("kubectl")
}

fn render(dir: &str) -> String {
    let out = Command::new(kubectl())
        .arg("kustomize")
        .arg(repo_root().join("deploy/k8s").join(dir))
        .output()
        .expect("kubectl runs (`just fetch-tools` provides one when none is installed)");
    assert!(
        out.status.success(),
        "kubectl kustomize {dir}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

fn validate(name: &str, yaml: &str) -> String {
    let tool = repo_root().join(".tools/k8s-venv/bin/kubernetes-validate");
    assert!(
        tool.is_file(),
        "{} is missing: run `just fetch-tools`",
        tool.display()
    );
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join(format!("{name}.yaml"));
    std::fs::write(&file, yaml).unwrap();
    let out = Command::new(tool)
        .args(["--strict", "-k", KUBERNETES_VERSION])
        .arg(&file)
        .output()
        .unwrap();
    let text =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{name} does not validate:\n{text}");
    assert!(!text.contains("ERROR"), "{name}:\n{text}");
    text
}

fn config(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap()
}

fn number_after(yaml: &str, key: &str) -> u64 {
    yaml.lines()
        .find_map(|l| l.trim().strip_prefix(key))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("{key} not found"))
}

#[test]
fn base_renders_validates_and_wires_the_sidecar() {
    let yaml = render("base");
    let report = validate("base", &yaml);
    for kind in [
        "deployment/app-with-modelpool",
        "networkpolicy/modelpool-sidecar",
        "configmap/modelpool-config",
    ] {
        assert!(
            report.contains(&format!("passed for resource {kind}")),
            "{kind}: {report}"
        );
    }
    // Native gRPC probes against grpc.health.v1 on the API port.
    assert_eq!(
        yaml.matches("grpc:\n            port: 50051").count(),
        3,
        "{yaml}"
    );
    assert!(yaml.contains("service: modelpool.v1.Inference"));
    // The RAM budget follows the container's memory limit.
    let env = yaml
        .find("name: MODELPOOL__POOL__MEMORY_LIMIT")
        .expect("budget env var");
    let wiring = &yaml[env..(env + 200).min(yaml.len())];
    assert!(
        wiring.contains("resourceFieldRef") && wiring.contains("resource: limits.memory"),
        "{wiring}"
    );
    // The grace period covers the preStop pause and the server's drain.
    let settings = Settings::from_toml(
        &config(&repo_root().join("deploy/k8s/base/modelpool.toml")),
        Path::new("/"),
    )
    .expect("the base configuration is valid");
    let grace = number_after(&yaml, "terminationGracePeriodSeconds:");
    let pause = number_after(&yaml, "seconds:");
    assert!(
        Duration::from_secs(grace) > settings.drain_timeout + Duration::from_secs(pause),
        "grace {grace}s vs drain {:?} + preStop {pause}s",
        settings.drain_timeout
    );
}

#[test]
fn gpu_overlay_asks_for_a_gpu_and_a_vram_budget() {
    let yaml = render("overlays/gpu");
    validate("gpu", &yaml);
    assert!(yaml.contains("nvidia.com/gpu: 1"));
    assert!(yaml.contains("image: modelpool:0.1.0-cuda"));
    let text = config(&repo_root().join("deploy/k8s/overlays/gpu/modelpool.toml"));
    assert!(text.contains("vram_budget = \"auto\""));
    let parsed = Settings::from_toml(&text, Path::new("/"));
    if modelpool_server::CUDA_BUILD {
        parsed.expect("valid on a CUDA build");
    } else {
        // A CPU-only build refuses GPU models up front instead of falling back.
        let err = parsed.unwrap_err().to_string();
        assert!(err.contains("`cuda` feature"), "{err}");
    }
}

#[test]
fn modelmesh_overlay_declares_the_runtime() {
    let yaml = render("overlays/modelmesh");
    let report = validate("modelmesh", &yaml);
    assert!(
        report.contains("passed for resource configmap/modelpool-modelmesh-config"),
        "{report}"
    );
    assert!(yaml.contains("kind: ServingRuntime"));
    assert!(yaml.contains("grpcEndpoint: port:8085"));
    assert!(yaml.contains("grpcDataEndpoint: port:50051"));
    assert!(yaml.contains("multiModel: true"));
    // Its configuration is one modelpool accepts (model root swapped for a real dir).
    let root = tempfile::tempdir().unwrap();
    let text = config(&repo_root().join("deploy/k8s/overlays/modelmesh/modelpool.toml"))
        .replace("\"/models\"", &format!("\"{}\"", root.path().display()));
    let settings = Settings::from_toml(&text, Path::new("/")).expect("valid modelmesh config");
    let mm = settings.modelmesh.expect("modelmesh enabled");
    assert_eq!(mm.listen.port(), 8085);
}
