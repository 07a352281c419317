// tests/cuda_on_cpu.hpp -- just enough of CUDA for kernels.cu to compile as ordinary C++ and run
// on the CPU, so `make test` checks every kernel on machines without a GPU.
//
// A launch runs every thread of every block, one after another inside a block; with OpenMP the
// blocks are spread over CPU threads (blockIdx, threadIdx are per CPU thread). That is only right
// because no kernel in kernels.cu talks to another thread (no shared memory, no __syncthreads, no
// atomics): each CUDA thread computes its own outputs. "Device memory" is host memory.
// Launch from one host thread at a time (gridDim and blockDim are shared), as on one CUDA stream.
#pragma once
#include <cstdio>
#include <cstdlib>
#include <cstring>

#define __global__
#define __device__
#define __host__

struct dim3 {
    unsigned x, y, z;
    dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};
inline dim3 gridDim, blockDim;                      // set once per launch, read by every thread
inline thread_local dim3 blockIdx, threadIdx;       // the running thread's coordinates

// LAUNCH(kernel, grid, block, args...) is kernel<<<grid, block>>>(args...) under nvcc
#ifdef _OPENMP
#define CUDA_ON_CPU_BLOCKS _Pragma("omp parallel for")
#else
#define CUDA_ON_CPU_BLOCKS
#endif
#define LAUNCH(kernel, grid, block, ...)                                                            \
    do {                                                                                            \
        gridDim = dim3(grid);                                                                       \
        blockDim = dim3(block);                                                                     \
        long nblocks_ = (long)gridDim.x * gridDim.y * gridDim.z;                                    \
        CUDA_ON_CPU_BLOCKS for (long blk_ = 0; blk_ < nblocks_; blk_++) {                           \
            long bx_ = blk_ % gridDim.x, by_ = blk_ / gridDim.x % gridDim.y;                        \
            long bz_ = blk_ / gridDim.x / gridDim.y;                                                \
            blockIdx = dim3(bx_, by_, bz_);                                                         \
            for (unsigned tz_ = 0; tz_ < blockDim.z; tz_++)                                         \
                for (unsigned ty_ = 0; ty_ < blockDim.y; ty_++)                                     \
                    for (unsigned tx_ = 0; tx_ < blockDim.x; tx_++) {                               \
                        threadIdx = dim3(tx_, ty_, tz_);                                            \
                        kernel(__VA_ARGS__);                                                        \
                    }                                                                               \
        }                                                                                           \
    } while (0)

// the runtime API on host memory
typedef int cudaError_t;
enum { cudaSuccess = 0, cudaErrorMemoryAllocation = 2 };
enum cudaMemcpyKind { cudaMemcpyHostToHost, cudaMemcpyHostToDevice, cudaMemcpyDeviceToHost, cudaMemcpyDeviceToDevice };

template <class T> cudaError_t cudaMalloc(T** p, size_t bytes) {
    *p = (T*)malloc(bytes ? bytes : 1);
    return *p ? cudaSuccess : cudaErrorMemoryAllocation;
}
inline cudaError_t cudaFree(void* p) { free(p); return cudaSuccess; }
inline cudaError_t cudaMemcpy(void* dst, const void* src, size_t bytes, cudaMemcpyKind) {
    memmove(dst, src, bytes);
    return cudaSuccess;
}
inline cudaError_t cudaMemset(void* p, int value, size_t bytes) { memset(p, value, bytes); return cudaSuccess; }
inline cudaError_t cudaDeviceSynchronize() { return cudaSuccess; }
inline cudaError_t cudaGetLastError() { return cudaSuccess; }
inline cudaError_t cudaGetDeviceCount(int* n) { *n = 1; return cudaSuccess; }   // "the CPU"
struct cudaDeviceProp { char name[256]; };
inline cudaError_t cudaGetDeviceProperties(cudaDeviceProp* p, int) {
    snprintf(p->name, sizeof p->name, "the CPU (tests/cuda_on_cpu.hpp)");
    return cudaSuccess;
}
inline const char* cudaGetErrorString(cudaError_t e) { return e == cudaSuccess ? "no error" : "out of memory"; }
