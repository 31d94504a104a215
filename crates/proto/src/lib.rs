//! Generated protobuf and gRPC code: the public `modelpool.v1` API and the private
//! `modelpool.worker.v1` protocol between the server and its worker processes.
//! Nothing here is written by hand except these re-exports.

#![allow(clippy::all, missing_docs)]

pub mod v1 {
    tonic::include_proto!("modelpool.v1");
}

/// KServe ModelMesh's model-runtime API (`mmesh.ModelRuntime`), served when modelpool
/// runs as a ModelMesh runtime.
pub mod mmesh {
    tonic::include_proto!("mmesh");
}

/// KServe's Open Inference Protocol v2 as Triton serves it
/// (`inference.GRPCInferenceService`), served on the public gRPC port.
pub mod kserve {
    tonic::include_proto!("inference");
}

pub mod worker {
    pub mod v1 {
        tonic::include_proto!("modelpool.worker.v1");
    }
}

/// Encoded `FileDescriptorSet` of the public API (`modelpool.v1`, `inference`), for gRPC server
/// reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] =
    include_bytes!(concat!(env!("OUT_DIR"), "/modelpool_descriptor.bin"));
