/* reduce.cuh — the deterministic reductions of the training ops: sums in
 * double in an order fixed by the shape (no atomics; the same step twice
 * gives the same bits on any GPU).
 *
 *   kv_cuda_plane_sums   two sums per (sample, channel) over the pixels of an
 *                        (N, C, H, W) tensor in the backend's layout, of
 *                        values a functor computes from an element's storage
 *                        index (group-norm and batch-norm backward, bias
 *                        gradients);
 *   kv_cuda_total        the sum of a functor over count elements, brought to
 *                        the host (losses, KL, norms): the one place where a
 *                        training op waits for the device.
 *
 * Partial sums go to a temporary block and are added by a second kernel in
 * chunk order. */
#ifndef KV_REDUCE_CUH
#define KV_REDUCE_CUH

#include "cuda_ops.h"

#define KV_REDUCE_THREADS 256
#define KV_REDUCE_PIXELS 128     /* NHWC: pixels per block of kv_cuda_plane_sums */
#define KV_REDUCE_CHUNK 16384    /* NCHW and totals: elements per block */

/* Two doubles summed over a block in a fixed order (warp shuffles, then the
 * warps in order); the result is valid in thread 0. */
static __device__ __forceinline__ double2 kv_block_sum2(double2 v, double2 *shared)
{
    for (int offset = 16; offset > 0; offset >>= 1) {
        v.x += __shfl_down_sync(0xFFFFFFFFu, v.x, offset);
        v.y += __shfl_down_sync(0xFFFFFFFFu, v.y, offset);
    }
    if (threadIdx.x % 32 == 0)
        shared[threadIdx.x / 32] = v;
    __syncthreads();
    if (threadIdx.x == 0)
        for (int w = 1; w < (int)(blockDim.x / 32); w++) {
            v.x += shared[w].x;
            v.y += shared[w].y;
        }
    __syncthreads();
    return v;
}

/* NCHW: block (k, plane) sums chunk k of plane's pixels. */
template <typename F>
static __global__ void __launch_bounds__(KV_REDUCE_THREADS)
    kv_plane_sums_nchw_kernel(F f, int channels, size_t pixels, int chunks, double2 *partial)
{
    __shared__ double2 shared[KV_REDUCE_THREADS / 32];
    const size_t plane = blockIdx.y;
    const int k = blockIdx.x;
    const size_t p0 = pixels * k / chunks, p1 = pixels * (k + 1) / chunks;
    const int c = (int)(plane % channels), n = (int)(plane / channels);
    double2 s = make_double2(0.0, 0.0);
    for (size_t p = p0 + threadIdx.x; p < p1; p += KV_REDUCE_THREADS) {
        double2 v = f(plane * pixels + p, n, c);
        s.x += v.x;
        s.y += v.y;
    }
    s = kv_block_sum2(s, shared);
    if (threadIdx.x == 0)
        partial[plane * chunks + k] = s;
}

/* NHWC: block (k, n) sums pixels [k * KV_REDUCE_PIXELS, ...) of sample n,
 * thread t every channel t + j * blockDim.x over them in pixel order. */
template <typename F>
static __global__ void __launch_bounds__(KV_REDUCE_THREADS)
    kv_plane_sums_nhwc_kernel(F f, int channels, size_t pixels, int chunks, double2 *partial)
{
    const int n = blockIdx.y, k = blockIdx.x;
    const size_t p0 = (size_t)k * KV_REDUCE_PIXELS;
    const size_t p1 = p0 + KV_REDUCE_PIXELS < pixels ? p0 + KV_REDUCE_PIXELS : pixels;
    for (int c = threadIdx.x; c < channels; c += KV_REDUCE_THREADS) {
        double2 s = make_double2(0.0, 0.0);
        for (size_t p = p0; p < p1; p++) {
            double2 v = f(((size_t)n * pixels + p) * channels + c, n, c);
            s.x += v.x;
            s.y += v.y;
        }
        partial[((size_t)n * channels + c) * chunks + k] = s;
    }
}

/* out[nc] = the chunk sums of plane nc, in chunk order. */
static __global__ void kv_plane_sums_finish_kernel(const double2 *partial, int chunks,
                                                   size_t planes, double2 *out)
{
    for (size_t nc = blockIdx.x * (size_t)blockDim.x + threadIdx.x; nc < planes;
         nc += (size_t)gridDim.x * blockDim.x) {
        double2 s = make_double2(0.0, 0.0);
        for (int k = 0; k < chunks; k++) {
            s.x += partial[nc * chunks + k].x;
            s.y += partial[nc * chunks + k].y;
        }
        out[nc] = s;
    }
}

/* out (device, N * C double2) = per (sample, channel), the sums over the
 * pixels of f(storage index, n, c), for an (n, c, h, w) tensor stored in
 * the backend's layout. */
template <typename F>
static klvae_status_t kv_cuda_plane_sums(kv_cuda *cu, int n, int c, int h, int w, F f,
                                         double2 *out)
{
    const size_t pixels = (size_t)h * w, planes = (size_t)n * c;
    if (!planes)
        return KLVAE_OK;
    const bool nhwc = cu->nhwc && pixels > 1;
    int chunks;
    if (nhwc)
        chunks = (int)((pixels + KV_REDUCE_PIXELS - 1) / KV_REDUCE_PIXELS);
    else
        chunks = (int)((pixels + KV_REDUCE_CHUNK - 1) / KV_REDUCE_CHUNK);
    if (chunks < 1)
        chunks = 1;
    if (planes > 65535 && !nhwc)
        return kv_cuda_error(cu, KLVAE_ERR_UNSUPPORTED,
                             "per-channel sums of %d x %d planes: more than 65535", n, c);
    if (n > 65535)
        return kv_cuda_error(cu, KLVAE_ERR_UNSUPPORTED, "per-channel sums of a batch of %d", n);
    double2 *partial = NULL;
    KV_TRY(kv_cuda_temp(cu, planes * chunks * sizeof(double2), "per-channel sums",
                        (void **)&partial));
    if (nhwc)
        kv_plane_sums_nhwc_kernel<F><<<dim3(chunks, n), KV_REDUCE_THREADS, 0, cu->stream>>>(
            f, c, pixels, chunks, partial);
    else
        kv_plane_sums_nchw_kernel<F><<<dim3(chunks, (unsigned)planes), KV_REDUCE_THREADS, 0,
                                       cu->stream>>>(f, c, pixels, chunks, partial);
    cudaError_t e = cudaGetLastError();
    if (e == cudaSuccess) {
        kv_plane_sums_finish_kernel<<<kv_cuda_blocks(planes, cu), 256, 0, cu->stream>>>(
            partial, chunks, planes, out);
        e = cudaGetLastError();
    }
    kv_cuda_temp_free(cu, partial);
    return e == cudaSuccess ? KLVAE_OK : kv_cuda_fail(cu, e, "per-channel sums");
}

/* Block k sums f(i) over chunk k of [0, count). */
template <typename F>
static __global__ void __launch_bounds__(KV_REDUCE_THREADS)
    kv_total_kernel(F f, size_t count, double2 *partial)
{
    __shared__ double2 shared[KV_REDUCE_THREADS / 32];
    const size_t i0 = (size_t)blockIdx.x * KV_REDUCE_CHUNK;
    const size_t i1 = i0 + KV_REDUCE_CHUNK < count ? i0 + KV_REDUCE_CHUNK : count;
    double2 s = make_double2(0.0, 0.0);
    for (size_t i = i0 + threadIdx.x; i < i1; i += KV_REDUCE_THREADS) {
        double2 v = f(i);
        s.x += v.x;
        s.y += v.y;
    }
    s = kv_block_sum2(s, shared);
    if (threadIdx.x == 0)
        partial[blockIdx.x] = s;
}

/* One thread adds the chunks in order (a few thousand at most). */
static __global__ void kv_total_finish_kernel(const double2 *partial, size_t chunks, double2 *out)
{
    if (blockIdx.x == 0 && threadIdx.x == 0) {
        double2 s = make_double2(0.0, 0.0);
        for (size_t k = 0; k < chunks; k++) {
            s.x += partial[k].x;
            s.y += partial[k].y;
        }
        *out = s;
    }
}

/* The device's sums of f over [0, count) into device memory at out (one
 * double2), no wait. */
template <typename F>
static klvae_status_t kv_cuda_total_async(kv_cuda *cu, size_t count, F f, double2 *out)
{
    const size_t chunks = count ? (count + KV_REDUCE_CHUNK - 1) / KV_REDUCE_CHUNK : 1;
    if (chunks > 0x7FFFFFFF)
        return kv_cuda_error(cu, KLVAE_ERR_UNSUPPORTED, "a sum over %zu elements", count);
    double2 *partial = NULL;
    KV_TRY(kv_cuda_temp(cu, chunks * sizeof(double2), "a sum's partial sums", (void **)&partial));
    cudaError_t e = cudaSuccess;
    if (count) {
        kv_total_kernel<F><<<(unsigned)chunks, KV_REDUCE_THREADS, 0, cu->stream>>>(f, count,
                                                                                    partial);
        e = cudaGetLastError();
    } else {
        e = cudaMemsetAsync(partial, 0, sizeof(double2), cu->stream);
    }
    if (e == cudaSuccess) {
        kv_total_finish_kernel<<<1, 32, 0, cu->stream>>>(partial, chunks, out);
        e = cudaGetLastError();
    }
    kv_cuda_temp_free(cu, partial);
    return e == cudaSuccess ? KLVAE_OK : kv_cuda_fail(cu, e, "a sum");
}

/* The same, brought to the host: waits for the stream. */
template <typename F>
static klvae_status_t kv_cuda_total(kv_cuda *cu, size_t count, F f, double *sum, double *sum2)
{
    double2 *device = NULL;
    KV_TRY(kv_cuda_temp(cu, sizeof(double2), "a sum", (void **)&device));
    klvae_status_t st = kv_cuda_total_async(cu, count, f, device);
    if (st == KLVAE_OK)
        st = kv_cuda_to_host(cu, device, sizeof(double2));
    kv_cuda_temp_free(cu, device);
    if (st == KLVAE_OK) {
        const double2 *h = (const double2 *)cu->host_scalars;
        if (sum)
            *sum = h->x;
        if (sum2)
            *sum2 = h->y;
    }
    return st;
}

#endif /* KV_REDUCE_CUH */
