//! End-to-end tests against the real SmolLM2 model, real worker processes and real gRPC
//! over loopback TCP. One test binary (linking mistral.rs is slow), one module per area.

mod e2e {
    mod cancel;
    mod chat;
    mod cli;
    mod engines;
    mod fair;
    mod faults;
    mod gpu;
    mod grpcurl;
    mod invalid;
    mod kserve;
    mod kv;
    mod modelmesh;
    mod openai;
    mod ops;
    mod pool;
    mod prefix;
    mod process;
    mod quantized;
    mod security;
    mod storage;
    mod swap;
    mod synth;
    mod tls;
}
