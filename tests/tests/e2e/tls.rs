//! TLS and mutual TLS on the gRPC port, with certificates made by the openssl CLI: a
//! client that trusts the CA talks to the server, plaintext and unknown clients don't,
//! and with `client_ca` only clients holding a CA-signed certificate get in.

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use modelpool_proto::v1::model_control_client::ModelControlClient;
use modelpool_proto::v1::ListModelsRequest;
use modelpool_server::config::TlsSettings;
use modelpool_tests::{ask_capital, modelpool_exe, serial, settings};
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Identity};

fn openssl(dir: &Path, args: &[&str]) {
    let out = Command::new("openssl")
        .args(args)
        .current_dir(dir)
        .output()
        .expect("openssl runs");
    assert!(
        out.status.success(),
        "openssl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A CA, and a server (127.0.0.1) and a client certificate it signed.
fn make_pki(dir: &Path) {
    let ec = [
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:prime256v1",
        "-nodes",
    ];
    let mut ca = vec!["req", "-x509"];
    ca.extend(ec);
    ca.extend([
        "-keyout",
        "ca.key",
        "-out",
        "ca.pem",
        "-days",
        "2",
        "-subj",
        "/CN=modelpool test CA",
    ]);
    openssl(dir, &ca);
    for (name, san) in [
        ("server", "IP:127.0.0.1,DNS:localhost"),
        ("client", "DNS:client"),
    ] {
        let mut req = vec!["req"];
        req.extend(ec);
        let (key, csr, pem, ext) = (
            format!("{name}.key"),
            format!("{name}.csr"),
            format!("{name}.pem"),
            format!("{name}.ext"),
        );
        std::fs::write(dir.join(&ext), format!("subjectAltName={san}\n")).unwrap();
        let subj = format!("/CN={name}");
        req.extend(["-keyout", &key, "-out", &csr, "-subj", &subj]);
        openssl(dir, &req);
        openssl(
            dir,
            &[
                "x509",
                "-req",
                "-in",
                &csr,
                "-CA",
                "ca.pem",
                "-CAkey",
                "ca.key",
                "-CAcreateserial",
                "-out",
                &pem,
                "-days",
                "2",
                "-extfile",
                &ext,
            ],
        );
    }
}

async fn channel(
    addr: std::net::SocketAddr,
    tls: Option<ClientTlsConfig>,
) -> Result<Channel, tonic::transport::Error> {
    let scheme = if tls.is_some() { "https" } else { "http" };
    let mut e = Channel::from_shared(format!("{scheme}://{addr}"))
        .unwrap()
        .connect_timeout(Duration::from_secs(5));
    if let Some(tls) = tls {
        e = e.tls_config(tls)?;
    }
    e.connect().await
}

async fn lists_models(channel: Channel) -> Result<usize, tonic::Status> {
    let r = ModelControlClient::new(channel)
        .list_models(ListModelsRequest {})
        .await?;
    Ok(r.into_inner().models.len())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_and_mutual_tls_keep_out_who_does_not_hold_the_keys() {
    let _serial = serial().await;
    let pki = tempfile::tempdir().unwrap();
    let d = pki.path();
    make_pki(d);
    let ca = Certificate::from_pem(std::fs::read(d.join("ca.pem")).unwrap());
    let trusts_ca = || ClientTlsConfig::new().ca_certificate(ca.clone());
    let runtime = tempfile::tempdir().unwrap();

    // TLS: the server proves itself; any client that trusts the CA may talk.
    let mut s = settings(&["smollm2"], runtime.path());
    s.tls = Some(TlsSettings {
        cert: d.join("server.pem"),
        key: d.join("server.key"),
        client_ca: None,
    });
    let server = modelpool_server::start(s).await.expect("tls server starts");
    let addr = server.local_addr;
    let secure = channel(addr, Some(trusts_ca()))
        .await
        .expect("tls connects");
    assert!(ask_capital(secure, "smollm2").await.contains("Paris"));
    let plain = channel(addr, None).await.expect("tcp connects");
    assert!(
        lists_models(plain).await.is_err(),
        "plaintext gRPC is refused"
    );
    let stranger = ClientTlsConfig::new().ca_certificate(Certificate::from_pem(
        std::fs::read(d.join("server.pem")).unwrap(),
    ));
    let refused = match channel(addr, Some(stranger)).await {
        Ok(c) => lists_models(c).await.is_err(),
        Err(_) => true,
    };
    assert!(
        refused,
        "a client that does not trust the server's CA gets nothing"
    );
    // The CLI speaks TLS too.
    let out = Command::new(modelpool_exe())
        .args(["models", "--json", "--addr", &addr.to_string(), "--tls-ca"])
        .arg(d.join("ca.pem"))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("smollm2"));
    server.stop().await.unwrap();

    // Mutual TLS: without a client certificate signed by client_ca, no handshake.
    let mut s = settings(&["smollm2"], runtime.path());
    s.tls = Some(TlsSettings {
        cert: d.join("server.pem"),
        key: d.join("server.key"),
        client_ca: Some(d.join("ca.pem")),
    });
    let server = modelpool_server::start(s)
        .await
        .expect("mtls server starts");
    let addr = server.local_addr;
    let anonymous = match channel(addr, Some(trusts_ca())).await {
        Ok(c) => lists_models(c).await.is_err(),
        Err(_) => true,
    };
    assert!(anonymous, "a client without a certificate is refused");
    let identity = Identity::from_pem(
        std::fs::read(d.join("client.pem")).unwrap(),
        std::fs::read(d.join("client.key")).unwrap(),
    );
    let mutual = channel(addr, Some(trusts_ca().identity(identity)))
        .await
        .expect("mtls connects");
    assert_eq!(lists_models(mutual).await.unwrap(), 1);
    server.stop().await.unwrap();
}
