// kernels.cu -- CUDA versions of the ops in tensor.hpp (forward and backward) and of the Cache
// Processor's four steps, one plain kernel per op with the CPU op's name for its launcher.
//
// Not written yet: this is the CUDA issue's work. Until then `make USE_CUDA=1` says so and builds
// the CPU version; nothing in bt needs this file.
