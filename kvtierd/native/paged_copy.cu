// Batched copies between a worker's paged KV cache and daemon slots, compiled
// at run time by NVRTC (kvtierd/gpu/kernels.py loads this file with cupy).
//
// One launch moves a whole batch: the grid is persistent (a few blocks per SM)
// and walks "items", each one chunk of one page of one plane of one block, so
// thousands of scattered 16 KiB pages cost one launch instead of one
// cudaMemcpyAsync each (the trap: ~1 GB/s). Consecutive items write
// consecutive slot bytes, which keeps PCIe writes to mapped host memory in
// whole lines.
//
// A plane is one tensor whose dimension `page_dim` indexes pages (a layer's K,
// or V). The host side describes each plane in 16 int64 words:
//   [0] base address of page 0        [1] bytes between pages
//   [2] bytes of one page              [3] offset of the plane's pages in a block
//   [4] ndim of one page (byte dims)   [5] widest vector width the plane allows
//   [6..10] sizes, outermost first     [11..15] strides in bytes
// Sizes/strides are in bytes with the innermost dim contiguous (stride 1), so a
// vector of width vw never straddles a run; a contiguous page is ndim == 1 and
// takes the straight 16-byte path.
//
// Block layout (the daemon's slot bytes): planes in order, each plane's
// `group` pages in order, each page row-major: plane p, page j of a block sits
// at slot + block_off[p] + j * page_bytes[p].

typedef long long i64;
typedef unsigned long long u64;

#define PLANE_WORDS 16
#define MAX_DIMS 5
#define UNROLL 4

__device__ __forceinline__ i64 imin(i64 a, i64 b) { return a < b ? a : b; }

// Contiguous run: every thread keeps UNROLL vectors in flight before storing,
// which matters most when one side is host memory across PCIe (latency ~1 us).
template <typename V>
__device__ __forceinline__ void copy_run(char* __restrict__ dst, const char* __restrict__ src, i64 nbytes)
{
    const i64 n = nbytes / (i64)sizeof(V);
    const V* s = reinterpret_cast<const V*>(src);
    V* d = reinterpret_cast<V*>(dst);
    const i64 step = (i64)blockDim.x;
    for (i64 k = threadIdx.x; k < n; k += UNROLL * step) {
        V r[UNROLL];
#pragma unroll
        for (int u = 0; u < UNROLL; ++u) {
            const i64 kk = k + u * step;
            if (kk < n) r[u] = s[kk];
        }
#pragma unroll
        for (int u = 0; u < UNROLL; ++u) {
            const i64 kk = k + u * step;
            if (kk < n) d[kk] = r[u];
        }
    }
}

// Strided page: `lin` is the linear (slot) side, `strided` the page; byte
// offset `start` of the page's linear order begins this chunk.
template <typename V>
__device__ __forceinline__ void copy_strided(char* lin, char* strided, i64 start, i64 nbytes,
                                             const i64* size, const i64* stride, int ndim, bool to_lin)
{
    const i64 n = nbytes / (i64)sizeof(V);
    for (i64 k = threadIdx.x; k < n; k += blockDim.x) {
        i64 rem = start + k * (i64)sizeof(V);
        i64 off = 0;
        for (int d = ndim - 1; d >= 0; --d) {
            const i64 s = size[d];
            off += (rem % s) * stride[d];
            rem /= s;
        }
        V* l = reinterpret_cast<V*>(lin + k * (i64)sizeof(V));
        V* p = reinterpret_cast<V*>(strided + off);
        if (to_lin) *l = *p; else *p = *l;
    }
}

template <typename V>
__device__ __forceinline__ void move_item(char* slot, char* page, i64 start, i64 len,
                                          const i64* P, bool gather)
{
    const int ndim = (int)P[4];
    if (ndim == 1) {
        if (gather) copy_run<V>(slot, page + start, len);
        else copy_run<V>(page + start, slot, len);
    } else {
        copy_strided<V>(slot, page, start, len, P + 6, P + 11, ndim, gather);
    }
}

// gather != 0: pages -> slots; gather == 0: slots -> pages.
// page_ids[b * group + j] is page j of block b; slot_offs[b] its slot in `region`.
extern "C" __global__ void kv_pages(const i64* __restrict__ planes, int nplanes,
                                    const i64* __restrict__ page_ids, const i64* __restrict__ slot_offs,
                                    u64 region, int group, i64 nblocks, i64 chunk, i64 chunks_per_page,
                                    int dst_align, int gather)
{
    const i64 total = nblocks * (i64)nplanes * group * chunks_per_page;
    for (i64 w = blockIdx.x; w < total; w += gridDim.x) {
        const i64 c = w % chunks_per_page;
        i64 t = w / chunks_per_page;
        const int j = (int)(t % group);
        t /= group;
        const int p = (int)(t % nplanes);
        const i64 b = t / nplanes;
        const i64* P = planes + (i64)p * PLANE_WORDS;
        const i64 page_bytes = P[2];
        const i64 start = c * chunk;
        if (start >= page_bytes) continue;   // this plane has fewer chunks per page
        const i64 len = imin(chunk, page_bytes - start);
        char* page = reinterpret_cast<char*>(P[0] + page_ids[b * group + j] * P[1]);
        char* slot = reinterpret_cast<char*>(region + slot_offs[b] + P[3] + (i64)j * page_bytes + start);
        const int vw = (int)imin(P[5], (i64)dst_align);
        const bool g = gather != 0;
        switch (vw) {
            case 16: move_item<uint4>(slot, page, start, len, P, g); break;
            case 8:  move_item<uint2>(slot, page, start, len, P, g); break;
            case 4:  move_item<unsigned int>(slot, page, start, len, P, g); break;
            case 2:  move_item<unsigned short>(slot, page, start, len, P, g); break;
            default: move_item<unsigned char>(slot, page, start, len, P, g); break;
        }
    }
}

// Byte ranges between two regions: range r copies lens[r] bytes from
// src + src_offs[r] to dst + dst_offs[r]. Used for hbm <-> host moves of many
// blocks at once; each range is cut into `chunk`-byte items.
extern "C" __global__ void copy_ranges(u64 src, u64 dst, const i64* __restrict__ src_offs,
                                       const i64* __restrict__ dst_offs, const i64* __restrict__ lens,
                                       i64 nranges, i64 chunk, i64 chunks_per_range, int align)
{
    const i64 total = nranges * chunks_per_range;
    for (i64 w = blockIdx.x; w < total; w += gridDim.x) {
        const i64 r = w / chunks_per_range;
        const i64 start = (w % chunks_per_range) * chunk;
        const i64 n = lens[r];
        if (start >= n) continue;
        const i64 len = imin(chunk, n - start);
        char* d = reinterpret_cast<char*>(dst + dst_offs[r] + start);
        const char* s = reinterpret_cast<const char*>(src + src_offs[r] + start);
        switch (align) {
            case 16: copy_run<uint4>(d, s, len); break;
            case 8:  copy_run<uint2>(d, s, len); break;
            case 4:  copy_run<unsigned int>(d, s, len); break;
            case 2:  copy_run<unsigned short>(d, s, len); break;
            default: copy_run<unsigned char>(d, s, len); break;
        }
    }
}
