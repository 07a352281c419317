// device.hpp -- where bt's ops run: the CPU, or a CUDA device (--device cuda). Included by bt.cpp
// right after its utilities. OP(call) sends one op to tensor.hpp or to kernels.cu; DeviceMem owns
// device memory; to_device / to_host move the few numbers the host reads or writes (nothing on
// the CPU); use_device reads --device. Nothing here knows the model (kernels.cu, included here
// under CUDA, has the processor's steps too).
#pragma once

// --device cuda: a build with CUDA (make USE_CUDA=1: nvcc and -DUSE_CUDA) also compiles kernels.cu,
// whose launchers cuda::<op> take the arguments of the ops in tensor.hpp (and of the processor's
// steps in bt.cpp), as device pointers. tests/test_kernels.cpp defines BT_DEVICE itself and compiles
// kernels.cu with g++ through tests/cuda_on_cpu.hpp, so the device path runs in make test too.
#if defined(USE_CUDA) || defined(__CUDACC__)
#ifndef BT_DEVICE
#define BT_DEVICE
#endif
#endif
#ifdef BT_DEVICE
#include "kernels.cu"
#endif

// =============================================================================================
// Where the ops run: the CPU, or a CUDA device (--device cuda)
//
// Every op call of the model goes through OP(): OP(matmul_forward(out, inp, W, WT, N, IC, OC)) runs
// tensor.hpp's matmul_forward, or under --device cuda kernels.cu's cuda::matmul_forward with the
// same arguments. Without CUDA compiled in, OP(call) is just the call. There is one copy of the
// model's code (block_forward, bottleneck_step, forward_sequence, ...) for both.
// On the device, the buffers the ops touch (weights, gradients, AdamW moments, activations, the KV
// cache, the undo log) live in device memory. The few numbers the host needs (tokens in; the loss,
// logits and gradient norm out) go through to_device / to_host: explicit copies on the device,
// nothing at all on the CPU, where the host's copy and the ops' buffer are the same memory.
// =============================================================================================
#ifdef BT_DEVICE
static bool g_device = false;   // --device cuda (tests switch it on around a device run)
#define OP(call) (g_device ? cuda::call : ::call)
#else
static const bool g_device = false;
#define OP(call) ::call
#endif

// Device memory owned by a Model or a RunState, freed with it. Empty on the CPU.
struct DeviceMem {
    void* p = nullptr;
    DeviceMem() = default;
    DeviceMem(const DeviceMem&) = delete;
    DeviceMem& operator=(const DeviceMem&) = delete;
    ~DeviceMem() { release(); }
    void alloc(size_t bytes);   // replaces what it held; the new memory is zeroed
    void release();
};
#ifdef BT_DEVICE
void DeviceMem::alloc(size_t bytes) {
    release();
    cudaCheck(cudaMalloc(&p, bytes ? bytes : 1));
    cudaCheck(cudaMemset(p, 0, bytes));
}
void DeviceMem::release() {
    if (p) cudaCheck(cudaFree(p));
    p = nullptr;
}
#else
void DeviceMem::alloc(size_t) { INTERNAL("this bt was built without CUDA (make USE_CUDA=1)"); }
void DeviceMem::release() {}
#endif

// copy bytes from the host to the ops' buffer, from an ops' buffer to the host, or between two
// ops' buffers: cudaMemcpy with a device, memcpy without one
enum CopyDir { HOST_TO_DEVICE, DEVICE_TO_HOST, DEVICE_TO_DEVICE };
static void copy_bytes(void* dst, const void* src, size_t bytes, CopyDir dir) {
#ifdef BT_DEVICE
    static const cudaMemcpyKind kind[] = {cudaMemcpyHostToDevice, cudaMemcpyDeviceToHost, cudaMemcpyDeviceToDevice};
    cudaCheck(cudaMemcpy(dst, src, bytes, kind[dir]));
#else
    (void)dir;
    memcpy(dst, src, bytes);
#endif
}
// On the CPU dst == src for these two (the host copy IS the buffer): nothing to do.
static void to_device(void* dst, const void* src, size_t bytes) {
    if (dst != src && bytes) copy_bytes(dst, src, bytes, HOST_TO_DEVICE);
}
static void to_host(void* dst, const void* src, size_t bytes) {
    if (dst != src && bytes) copy_bytes(dst, src, bytes, DEVICE_TO_HOST);
}
static void device_copy(void* dst, const void* src, size_t bytes) { copy_bytes(dst, src, bytes, DEVICE_TO_DEVICE); }
// wait for the device's queued work (timings); nothing to wait for on the CPU
[[maybe_unused]] static void device_sync() {
#ifdef BT_DEVICE
    if (g_device) cudaCheck(cudaDeviceSynchronize());
#endif
}

// the GPU's name (the emulation in tests/cuda_on_cpu.hpp names itself)
[[maybe_unused]] static std::string device_name() {
#ifdef BT_DEVICE
    cudaDeviceProp prop;
    cudaCheck(cudaGetDeviceProperties(&prop, 0));
    return prop.name;
#else
    return "none";
#endif
}

// --device cpu | cuda: cuda sends every op through kernels.cu (OP) and puts the buffers on the GPU.
// Call before any model or run state is built.
static void use_device(const Args& a) {
    std::string d = a.str("device");
    if (d == "cpu") return;
    if (d != "cuda") BAD_INPUT("--device must be cpu or cuda, got '%s'", d.c_str());
#ifndef BT_DEVICE
    BAD_INPUT("this bt was built without CUDA: --device cuda needs a build with make USE_CUDA=1");
#else
    int n = 0;
    cudaError_t err = cudaGetDeviceCount(&n);
    if (err != cudaSuccess || n == 0)
        BAD_INPUT("--device cuda: no CUDA GPU found (%s); use --device cpu",
                  err != cudaSuccess ? cudaGetErrorString(err) : "0 devices");
    g_device = true;
#endif
}
