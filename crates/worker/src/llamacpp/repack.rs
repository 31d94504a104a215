//! Whether this build of llama.cpp repacks weights for ggml's CPU kernels.
//!
//! Repacking is a build-time choice here (`GGML_CPU_REPACK` in `.cargo/config.toml`):
//! llama-cpp-2 does not expose llama.cpp's per-model switch (`use_extra_bufts`), and a
//! CPU buffer override still selects the repacked buffer type. The CPU backend lists
//! the repacking buffer type among its "extra" buffer types when it is compiled in, so
//! the worker asks the backend and refuses a model whose `repack` setting the build
//! cannot honour, instead of silently holding a second, anonymous copy of the weights.

use std::ffi::{c_char, CStr};

use llama_cpp_sys_2 as sys;

use crate::EngineError;

/// The name ggml gives its CPU repacking buffer type.
const REPACK_BUFFER_TYPE: &str = "CPU_REPACK";

/// Whether the CPU backend has the repacking buffer type. Call after the backend is
/// initialized.
pub(super) fn compiled_in() -> bool {
    type ExtraBufts =
        unsafe extern "C" fn(sys::ggml_backend_dev_t) -> *mut sys::ggml_backend_buffer_type_t;
    // SAFETY: the device and registry come from ggml and live for the whole process; the
    // proc address, when present, has the signature ggml's backend interface documents
    // for `ggml_backend_dev_get_extra_bufts` and returns a null-terminated array.
    unsafe {
        let device = sys::ggml_backend_dev_by_type(sys::GGML_BACKEND_DEVICE_TYPE_CPU);
        if device.is_null() {
            return false;
        }
        let registry = sys::ggml_backend_dev_backend_reg(device);
        let name = c"ggml_backend_dev_get_extra_bufts";
        let address = sys::ggml_backend_reg_get_proc_address(registry, name.as_ptr());
        if address.is_null() {
            return false;
        }
        let extra_bufts: ExtraBufts = std::mem::transmute(address);
        let mut next = extra_bufts(device);
        while !next.is_null() && !(*next).is_null() {
            let name: *const c_char = sys::ggml_backend_buft_name(*next);
            if !name.is_null() && CStr::from_ptr(name).to_bytes() == REPACK_BUFFER_TYPE.as_bytes() {
                return true;
            }
            next = next.add(1);
        }
        false
    }
}

/// Refuses `repack` when this build cannot honour it.
pub(super) fn check(repack: bool) -> Result<(), EngineError> {
    match (repack, compiled_in()) {
        (false, true) => Err(EngineError::invalid(
            "repack",
            "this modelpool's llama.cpp repacks weights (built with GGML_CPU_REPACK=ON): \
             set repack = true for the model, or rebuild with GGML_CPU_REPACK=OFF to keep \
             weights mapped from the file",
        )),
        (true, false) => Err(EngineError::invalid(
            "repack",
            "this modelpool's llama.cpp was built without weight repacking \
             (GGML_CPU_REPACK=OFF in .cargo/config.toml); rebuild with GGML_CPU_REPACK=ON \
             in the environment to allow repack = true",
        )),
        _ => Ok(()),
    }
}
