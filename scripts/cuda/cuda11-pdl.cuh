// Force-included by `just build-cuda` (CMAKE_CUDA_FLAGS) when the toolkit is CUDA 11.x:
// ggml turns programmatic dependent launch on from CUDA 11.8, but CUDA 11.8's headers do
// not declare its two device functions. They are one PTX instruction each (PTX ISA 7.8,
// sm_90), so they are declared here, for Hopper device code, and only for CUDA < 12.
#pragma once
#include <cuda_runtime.h>
#if defined(__CUDACC__) && CUDART_VERSION < 12000 && defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
static __device__ __forceinline__ void cudaGridDependencySynchronize(void) {
    asm volatile("griddepcontrol.wait;" ::: "memory");
}
static __device__ __forceinline__ void cudaTriggerProgrammaticLaunchCompletion(void) {
    asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
}
#endif
