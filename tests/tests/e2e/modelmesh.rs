//! modelpool as a KServe ModelMesh runtime, driven the way ModelMesh drives it.

use std::time::Duration;

use modelpool_proto::mmesh::model_runtime_client::ModelRuntimeClient;
use modelpool_proto::mmesh::runtime_status_response::Status as RuntimeState;
use modelpool_proto::mmesh::{
    LoadModelRequest, ModelSizeRequest, PredictModelSizeRequest, RuntimeStatusRequest,
    UnloadModelRequest,
};
use modelpool_proto::v1::GetModelRequest;
use modelpool_tests::{
    eventually, model_path, predicted_bytes, process_alive, settings_toml, TestServer,
};
use tonic::transport::Channel;
use tonic::Code;

async fn server() -> (TestServer, ModelRuntimeClient<Channel>) {
    server_with("").await
}

/// A server with the ModelMesh runtime on, its `[pool]` section given by `pool`.
async fn server_with(pool: &str) -> (TestServer, ModelRuntimeClient<Channel>) {
    let root = model_path().parent().unwrap().canonicalize().unwrap();
    let pool = pool.to_owned();
    let t = TestServer::start_with(move |runtime| {
        let mut s = settings_toml(&pool, "", runtime);
        let mm = format!(
            "[modelmesh]\nlisten = \"127.0.0.1:0\"\nmodel_roots = [\"{}\"]\ncontext_length = 1024\n",
            root.display()
        );
        let text = format!("{mm}\n");
        let extra = modelpool_server::Settings::from_toml(&text, std::path::Path::new("/")).unwrap();
        s.modelmesh = extra.modelmesh;
        s
    })
    .await;
    let addr = t.server.modelmesh_addr.expect("modelmesh enabled");
    let channel = Channel::from_shared(format!("http://{addr}"))
        .unwrap()
        .connect()
        .await
        .unwrap();
    (t, ModelRuntimeClient::new(channel))
}

fn load(id: &str, path: &str) -> LoadModelRequest {
    LoadModelRequest {
        model_id: id.into(),
        model_type: "gguf".into(),
        model_path: path.into(),
        model_key: String::new(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn modelmesh_loads_routes_sizes_and_unloads() {
    let (t, mut mm) = server().await;
    let status = mm
        .runtime_status(RuntimeStatusRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(status.status, RuntimeState::Ready as i32);
    let pool = t.pool_status().await;
    assert_eq!(status.capacity_in_bytes, pool.devices[0].budget_bytes);
    for method in [
        "modelpool.v1.Inference/Chat",
        "modelpool.v1.Inference/Generate",
    ] {
        assert_eq!(
            status.method_infos[method].id_injection_path,
            vec![1],
            "{method}"
        );
    }

    let path = model_path().display().to_string();
    let predicted = mm
        .predict_model_size(PredictModelSizeRequest {
            model_id: "mm-1".into(),
            model_path: path.clone(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .size_in_bytes;
    assert_eq!(predicted, predicted_bytes(1024));

    let loaded = mm
        .load_model(load("mm-1", &path))
        .await
        .unwrap()
        .into_inner();
    assert!(loaded.size_in_bytes > 100 << 20, "{loaded:?}");
    // ModelMesh puts the model id in `model` (field 1) of each request it routes.
    assert!(t.ask_capital("mm-1").await.contains("Paris"));
    let size = mm
        .model_size(ModelSizeRequest {
            model_id: "mm-1".into(),
        })
        .await
        .unwrap()
        .into_inner()
        .size_in_bytes;
    assert!(size > 100 << 20);
    let info = t
        .control()
        .get_model(GetModelRequest { id: "mm-1".into() })
        .await
        .unwrap()
        .into_inner();
    assert!(
        info.pinned,
        "ModelMesh owns placement: the pool never evicts its models"
    );
    let pid = info.worker_pid;

    mm.unload_model(UnloadModelRequest {
        model_id: "mm-1".into(),
    })
    .await
    .unwrap();
    assert!(
        eventually(Duration::from_secs(30), || !process_alive(pid)).await,
        "worker gone"
    );
    let ids = t.model_ids().await;
    assert!(ids.is_empty(), "{ids:?}");
    // Unloading an unknown model is fine, as ModelMesh expects.
    mm.unload_model(UnloadModelRequest {
        model_id: "never".into(),
    })
    .await
    .unwrap();

    // Paths outside the model roots are refused before anything is registered.
    for bad in ["/etc/passwd", "../../etc/passwd", ""] {
        let err = mm.load_model(load("evil", bad)).await.unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument, "{bad}: {err:?}");
        assert!(err.message().starts_with("modelPath:"), "{}", err.message());
    }
    assert!(t.model_ids().await.is_empty());
    t.stop().await;
}

/// A model that does not fit is RESOURCE_EXHAUSTED with the numbers, the same code the
/// pool's own API gives (ModelMesh then places it on another instance), and nothing of it
/// stays registered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_model_that_does_not_fit_is_resource_exhausted_and_leaves_nothing() {
    let budget = predicted_bytes(1024) / 2;
    let (t, mut mm) = server_with(&format!("ram_budget = \"{budget}\"\n")).await;
    let path = model_path().display().to_string();
    let err = mm.load_model(load("mm-big", &path)).await.unwrap_err();
    assert_eq!(err.code(), Code::ResourceExhausted, "{err:?}");
    assert!(err.message().contains("does not fit"), "{}", err.message());
    assert!(t.model_ids().await.is_empty());
    let pool = t.pool_status().await;
    assert_eq!(pool.devices[0].used_bytes, 0, "{pool:?}");
    assert_eq!(pool.devices[0].reserved_bytes, 0, "{pool:?}");
    t.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cancelled_load_followed_by_unload_leaves_nothing() {
    let (t, mut mm) = server().await;
    mm.runtime_status(RuntimeStatusRequest {}).await.unwrap();
    let path = model_path().display().to_string();
    // ModelMesh gives up on the load after 20 ms (a llama.cpp worker needs 100-200 ms
    // to start and map the model, a mistral.rs one about a second)...
    let mut request = tonic::Request::new(load("mm-2", &path));
    request.set_timeout(Duration::from_millis(20));
    let err = mm.load_model(request).await.unwrap_err();
    assert!(
        matches!(err.code(), Code::DeadlineExceeded | Code::Cancelled),
        "{err:?}"
    );
    // ...and unloads it at once: when that returns, nothing is left.
    mm.unload_model(UnloadModelRequest {
        model_id: "mm-2".into(),
    })
    .await
    .unwrap();
    let status = t.pool_status().await;
    assert!(status.models.is_empty(), "{:?}", status.models);
    t.assert_nothing_charged().await;
    let sockets = std::fs::read_dir(&t.server.runtime_dir).unwrap().count();
    assert_eq!(sockets, 0, "a worker socket is left");
    t.stop().await;
}
