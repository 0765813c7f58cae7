// ONNX Runtime custom-op library: ai.repconv::Involution (float32, CPU execution provider).
//
// Semantics and schema: docs/involution_op.md. Built by `python -m repconv.runtime.build`.
//
// Design notes (why it looks like this):
//  * Pure C API (onnxruntime_c_api.h, header only) and no link against libonnxruntime: ORT hands us
//    its OrtApiBase in RegisterCustomOps, so the same .so works with the Python wheel's runtime.
//    We request API version 17 (the newest feature used: KernelContext_ParallelFor, shape-inference
//    context, ReadOpAttr), so any ORT >= 1.17 can load it.
//  * Only the V2 callbacks that return OrtStatus* are used and every callback body is wrapped in
//    try/catch: no C++ exception crosses the C ABI, every error becomes an ORT status (a Python
//    exception on the other side), never an abort.
//  * Parallelism uses ORT's intra-op thread pool (KernelContext_ParallelFor), so the session's
//    intra_op_num_threads is honoured; no OpenMP.
//  * Work item = (n, g, band of up to 8 output rows). Per block of 16 channels, the input rows the
//    band needs are copied once into a zero-padded scratch, de-interleaved by stride phase (so
//    strided taps are contiguous too); then tiles of 2 output rows (stride 1, dilation 1; else 1
//    row) x C channels x one vector of outputs accumulate all K*K taps in registers: each kernel
//    vector is loaded once for C channels and each input vector once for both rows (see Tile).
//    No unfold buffer, no bounds checks in the hot loop, no software prefetch (measured slower:
//    the prefetches stalled on fill buffers). The hot loop is compiled for x86-64-v4 (AVX-512),
//    -v3 (AVX2/FMA) and the portable baseline; the CPU picks at load time.
//  * The same kernel is exported as a plain C function (repconv_involution_f32) that repconv's
//    PyTorch op calls through ctypes for CPU float32 tensors.

#include <onnxruntime_c_api.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <mutex>
#include <new>
#include <string>
#include <thread>
#include <vector>

namespace {

constexpr uint32_t kApiVersion = 17;
constexpr const char* kDomain = "ai.repconv";
constexpr const char* kOpName = "Involution";

const OrtApi* g_api = nullptr;

// ------------------------------------------------------------------------------------------------
// Small helpers: ORT status plumbing
// ------------------------------------------------------------------------------------------------

OrtStatus* Fail(const std::string& msg, OrtErrorCode code = ORT_INVALID_ARGUMENT) {
  return g_api->CreateStatus(code, ("Involution: " + msg).c_str());
}

#define RETURN_IF_ERROR(expr)          \
  do {                                 \
    OrtStatus* _st = (expr);           \
    if (_st != nullptr) return _st;    \
  } while (0)

struct Attrs {
  int64_t k = 0, stride = 1, dilation = 1, groups = 1, padding = 0;
};

OrtStatus* ValidateAttrs(const Attrs& a) {
  if (a.k < 1 || a.k % 2 == 0) return Fail("kernel_size must be odd and >= 1, got " + std::to_string(a.k));
  if (a.k > 255) return Fail("kernel_size too large: " + std::to_string(a.k));
  if (a.stride < 1) return Fail("stride must be >= 1, got " + std::to_string(a.stride));
  if (a.dilation < 1) return Fail("dilation must be >= 1, got " + std::to_string(a.dilation));
  if (a.groups < 1) return Fail("groups must be >= 1, got " + std::to_string(a.groups));
  if (a.padding != a.dilation * (a.k - 1) / 2)
    return Fail("padding must equal dilation*(kernel_size-1)/2 = " +
                std::to_string(a.dilation * (a.k - 1) / 2) + ", got " + std::to_string(a.padding));
  return nullptr;
}

inline int64_t OutExtent(int64_t in, const Attrs& a) {
  if (in <= 0) return 0;  // (C++ division truncates toward zero: keep empty inputs empty)
  return (in + 2 * a.padding - a.dilation * (a.k - 1) - 1) / a.stride + 1;
}

std::string ShapeStr(const int64_t* d, size_t n) {
  std::string s = "(";
  for (size_t i = 0; i < n; ++i) s += (i ? ", " : "") + std::to_string(d[i]);
  return s + ")";
}

// ------------------------------------------------------------------------------------------------
// The compute kernel
// ------------------------------------------------------------------------------------------------

struct Problem {
  const float* x;
  const float* w;
  float* y;
  int64_t n, c, h, wd, ho, wo;
  Attrs a;
  int64_t cg, kk;
  int64_t phase_len;     // length of one de-interleaved scratch row: ceil((W + 2p) / s)
  int64_t band_rows;     // output rows per work item
  int64_t bands;         // work items per (n, g)
  int64_t scratch_rows;  // input rows one band can touch: (band_rows - 1) * s + (K - 1) * d + 1
  std::atomic<bool> failed{false};
};

#define REPCONV_INLINE inline __attribute__((always_inline))

template <int V>
struct Vec {
  typedef float type __attribute__((vector_size(V * sizeof(float))));
};

template <int V>
REPCONV_INLINE typename Vec<V>::type Load(const float* p) {
  typename Vec<V>::type v;
  __builtin_memcpy(&v, p, sizeof(v));  // unaligned vector load
  return v;
}

template <int V>
REPCONV_INLINE void Store(float* p, typename Vec<V>::type v) {
  __builtin_memcpy(p, &v, sizeof(v));
}

// One tile = up to R output rows x one vector of outputs x the channels of one scratch block.
//
// Loads, not FMAs, bound this op: a plain tap loop needs one kernel load per tap and one input load
// per tap and channel. Two reuses cut that:
//  * each kernel vector (per pixel, so it cannot live in a register) feeds C channels;
//  * with stride 1 and dilation 1, output row r at tap row ky reads input row i = r + ky, so each
//    input vector (row i, shift kx) is loaded once and feeds every output row r of the tile with
//    0 <= i - r < K: (C + R) loads per R*C FMAs instead of (1 + C) per C.
// R > 1 is used only for stride 1 / dilation 1; other geometries run R = 1 (any s, d).
struct Tile {
  float* y;             // output: channel 0 of the block, row oy0 (channel stride ystride)
  const float* w;       // kernel: tap 0, row oy0 (tap stride plane, row stride wo)
  const float* x;       // scratch: channel 0 of the block (channel stride cstride, row stride rstride)
  const int64_t* xoff;  // scratch offset of tap column kx (phase and position, see BandTask)
  const int64_t* rows;  // R == 1: scratch row offset of each active tap row ...
  const int64_t* kys;   // ... and its ky
  int64_t ystride, plane, cstride, rstride, wo, k;
  int64_t i_lo, i_hi;   // R > 1: tile input rows [i_lo, i_hi) lie in the image; scratch row of i: row0 + i
  int64_t row0, nky;
  int cb;               // channels in the block
};

template <int R, int C, int V>
REPCONV_INLINE void Block(const Tile& t, int c0, int64_t at) {
  typedef typename Vec<V>::type vec;
  vec acc[R][C];
  for (int r = 0; r < R; ++r)
    for (int c = 0; c < C; ++c) acc[r][c] = vec{};
  const float* const x = t.x + c0 * t.cstride + at;
  const int64_t K = t.k, plane = t.plane;
  if constexpr (R == 1) {
    for (int64_t j = 0; j < t.nky; ++j) {
      const float* xr = x + t.rows[j];
      const float* kr = t.w + t.kys[j] * K * plane + at;
      for (int64_t kx = 0; kx < K; ++kx, kr += plane) {
        const vec kv = Load<V>(kr);
        for (int c = 0; c < C; ++c) acc[0][c] += kv * Load<V>(xr + c * t.cstride + t.xoff[kx]);
      }
    }
  } else {
    for (int64_t i = t.i_lo; i < t.i_hi; ++i) {
      const float* xr = x + (t.row0 + i) * t.rstride;
      // Kernel of (row r, tap row ky = i - r); rows whose ky is out of range skip this input row.
      const float* kr[R];
      bool on[R];
      for (int r = 0; r < R; ++r) {
        on[r] = i - r >= 0 && i - r < K;
        kr[r] = on[r] ? t.w + r * t.wo + (i - r) * K * plane + at : nullptr;
      }
      for (int64_t kx = 0; kx < K; ++kx) {
        vec xv[C];
        for (int c = 0; c < C; ++c) xv[c] = Load<V>(xr + c * t.cstride + kx);
        for (int r = 0; r < R; ++r) {
          if (!on[r]) continue;
          const vec kv = Load<V>(kr[r] + kx * plane);
          for (int c = 0; c < C; ++c) acc[r][c] += kv * xv[c];
        }
      }
    }
  }
  for (int r = 0; r < R; ++r)
    for (int c = 0; c < C; ++c) Store<V>(t.y + (c0 + c) * t.ystride + r * t.wo + at, acc[r][c]);
}

// All channels of the block at one column position: blocks of C, then the rest one at a time.
// (Channels innermost: the tile's kernel vectors stay in L1 while every channel uses them.)
template <int R, int C, int V>
REPCONV_INLINE void Channels(const Tile& t, int64_t at) {
  int c = 0;
  for (; c + C <= t.cb; c += C) Block<R, C, V>(t, c, at);
  for (; c < t.cb; ++c) Block<R, 1, V>(t, c, at);
}

// Outputs [from, wo) of the tile, from + V <= wo required: full V-blocks, then the ragged end with
// half-width blocks, the very last one overlapping already computed outputs (idempotent) instead of
// a scalar tail.
template <int R, int C, int V>
REPCONV_INLINE void ColsFrom(const Tile& t, int64_t at) {
  for (; at + V <= t.wo; at += V) Channels<R, C, V>(t, at);
  if (at == t.wo) return;
  if constexpr (V >= 8) {
    if (t.wo - at <= V / 2) return ColsFrom<R, C, V / 2>(t, t.wo - V / 2 < at ? t.wo - V / 2 : at);
  }
  Channels<R, C, V>(t, t.wo - V);
}

template <int R, int C, int V>
REPCONV_INLINE void Cols(const Tile& t) {
  if constexpr (V > 1) {
    if (t.wo < V) return Cols<R, C, V / 2>(t);
    ColsFrom<R, C, V>(t, 0);
  } else {
    for (int64_t at = 0; at < t.wo; ++at) Channels<R, C, 1>(t, at);
  }
}

// A tile of `rows` (1..kTileRows) output rows; rows > 1 only for stride 1 / dilation 1.
template <int R, int C, int V>
REPCONV_INLINE void Tiles(const Tile& t, int rows) {
  if constexpr (R > 1) {
    if (rows < R) return Tiles<R - 1, C, V>(t, rows);
  }
  Cols<R, C, V>(t);
}

// The hot loop, compiled per ISA level with a register blocking (R*C accumulators + C inputs + 1
// kernel vector) that fits its register file; dispatched once at load time. Portable baseline:
// SSE (x86-64-v2) or the target's default.
constexpr int kMaxChanBlock = 16;
constexpr int kTileRows = 2;  // (larger R measured slower: fewer channels fit beside R*C accumulators)

void TilesBase(const Tile& t, int rows) { Tiles<kTileRows, 4, 4>(t, rows); }
#if defined(__x86_64__) && defined(__GNUC__) && !defined(REPCONV_NO_MULTIVERSION)
__attribute__((target("arch=x86-64-v3"))) void TilesV3(const Tile& t, int rows) { Tiles<kTileRows, 4, 8>(t, rows); }
__attribute__((target("arch=x86-64-v4"))) void TilesV4(const Tile& t, int rows) { Tiles<kTileRows, 8, 16>(t, rows); }

using TilesFn = void (*)(const Tile&, int);
TilesFn PickTiles() {
  __builtin_cpu_init();
  // REPCONV_NATIVE_ISA=base|v3 caps the level (tests exercise every variant on one machine).
  const char* cap = std::getenv("REPCONV_NATIVE_ISA");
  const std::string level = cap ? cap : "";
  if (level == "base") return TilesBase;
  if (level == "v3") return __builtin_cpu_supports("x86-64-v3") ? TilesV3 : TilesBase;
  if (__builtin_cpu_supports("x86-64-v4")) return TilesV4;
  if (__builtin_cpu_supports("x86-64-v3")) return TilesV3;
  return TilesBase;
}
const TilesFn g_tiles = PickTiles();
#else
constexpr auto g_tiles = TilesBase;
#endif

struct Scratch {
  // kMaxChanBlock x rows x stride x phase_len: zero-padded, de-interleaved input rows of one band.
  std::vector<float> rows;
  int64_t geometry[4] = {-1, -1, -1, -1};  // (cstride, p, W, s) the zero padding was laid out for
};

thread_local Scratch t_scratch;

// One work item: output rows [oy0, oy1) of all C/G channels of group g in image n. Per block of
// kMaxChanBlock channels, the input rows the band needs are copied once into the scratch (zero
// padded left/right, de-interleaved by stride phase), then tiles of output rows accumulate their taps.
void BandTask(const Problem& P, size_t task) {
  const Attrs& a = P.a;
  const int64_t band = static_cast<int64_t>(task) % P.bands;
  const int64_t ng = static_cast<int64_t>(task) / P.bands;  // n * G + g
  const int64_t oy0 = band * P.band_rows, oy1 = std::min(P.ho, oy0 + P.band_rows);
  const int64_t K = a.k, s = a.stride, d = a.dilation, p = a.padding;
  const int64_t plen = P.phase_len, W = P.wd, H = P.h, Wo = P.wo;
  // Input rows touched by the band (clipped to the image): [iy_lo, iy_hi).
  const int64_t iy_lo = std::max<int64_t>(0, oy0 * s - p);
  const int64_t iy_hi = std::min<int64_t>(H, (oy1 - 1) * s + (K - 1) * d - p + 1);
  const int64_t rstride = s * plen;                   // scratch floats per input row
  const int64_t cstride = P.scratch_rows * rstride;  // scratch floats per channel

  Scratch& S = t_scratch;
  const size_t need = static_cast<size_t>(kMaxChanBlock * cstride);
  const int64_t geometry[4] = {cstride, p, W, s};
  if (S.rows.size() < need || !std::equal(geometry, geometry + 4, S.geometry)) {
    // The padding columns are never written by the fills below, so they stay zero for every task
    // with the same geometry: zero only when the geometry changes.
    S.rows.assign(std::max(need, S.rows.size()), 0.f);
    std::copy(geometry, geometry + 4, S.geometry);
  }
  float* const rows = S.rows.data();  // plain local pointer: no thread-local lookups in the loops
  int64_t xoff[256];  // scratch offset of tap column kx: phase (kx*d) % s, position (kx*d) / s
  for (int64_t kx = 0; kx < K; ++kx) xoff[kx] = (kx * d % s) * plen + kx * d / s;
  int64_t tap_rows[256], tap_ky[256];  // R == 1 tiles: scratch row offset and ky of the active tap rows
  const bool multi_row = s == 1 && d == 1;
  const int64_t plane = P.ho * Wo;
  const int64_t c0 = (ng % a.groups) * P.cg, n = ng / a.groups;

  for (int64_t ci = 0; ci < P.cg; ci += kMaxChanBlock) {
    const int cb = static_cast<int>(std::min<int64_t>(kMaxChanBlock, P.cg - ci));
    for (int j = 0; j < cb; ++j) {
      const float* xplane = P.x + (n * P.c + c0 + ci + j) * H * W;
      for (int64_t iy = iy_lo; iy < iy_hi; ++iy) {
        const float* src = xplane + iy * W;
        float* dst = rows + j * cstride + (iy - iy_lo) * rstride;
        if (s == 1) {
          std::memcpy(dst + p, src, static_cast<size_t>(W) * sizeof(float));
        } else {
          for (int64_t ix = 0; ix < W; ++ix) {
            const int64_t q = ix + p;  // padded column q goes to phase q % s, position q / s
            dst[(q % s) * plen + q / s] = src[ix];
          }
        }
      }
    }
    Tile t;
    t.x = rows;
    t.xoff = xoff;
    t.rows = tap_rows;
    t.kys = tap_ky;
    t.ystride = plane;
    t.plane = plane;
    t.cstride = cstride;
    t.rstride = rstride;
    t.wo = Wo;
    t.k = K;
    t.cb = cb;
    const int64_t step = multi_row ? kTileRows : 1;
    for (int64_t oy = oy0; oy < oy1; oy += step) {
      const int rows_here = static_cast<int>(std::min<int64_t>(step, oy1 - oy));
      // Kernel plane of tap t for (n, g) starts at (ng*KK + t)*Ho*Wo; this tile at + oy*Wo.
      t.w = P.w + (ng * P.kk * P.ho + oy) * Wo;
      t.y = P.y + ((n * P.c + c0 + ci) * P.ho + oy) * Wo;
      if (rows_here > 1) {
        // Tile input row i is image row oy - p + i; rows outside the image read zero padding: skip.
        t.row0 = oy - p - iy_lo;
        t.i_lo = std::max<int64_t>(0, p - oy);
        t.i_hi = std::min<int64_t>(rows_here + K - 1, H - oy + p);
      } else {  // one row (any stride / dilation, or the last row of a band): the active tap rows
        int64_t nky = 0;
        for (int64_t ky = 0; ky < K; ++ky) {
          const int64_t iy = oy * s + ky * d - p;
          if (iy < 0 || iy >= H) continue;  // the whole tap row reads zero padding: skip it
          tap_rows[nky] = (iy - iy_lo) * rstride;
          tap_ky[nky++] = ky;
        }
        t.nky = nky;
      }
      g_tiles(t, rows_here);
    }
  }
}

void RunTask(void* data, size_t task) {
  auto* P = static_cast<Problem*>(data);
  if (P->failed.load(std::memory_order_relaxed)) return;
  try {
    BandTask(*P, task);
  } catch (...) {  // only bad_alloc is possible; never let it unwind into ORT's thread pool
    P->failed.store(true);
  }
}

// Fill the problem description; returns the number of work items.
size_t SetUp(Problem* P, const float* x, const float* w, float* y, int64_t n, int64_t c, int64_t h, int64_t wd,
             const Attrs& a) {
  P->x = x;
  P->w = w;
  P->y = y;
  P->n = n; P->c = c; P->h = h; P->wd = wd;
  P->ho = OutExtent(h, a);
  P->wo = OutExtent(wd, a);
  P->a = a;
  P->cg = c / a.groups;
  P->kk = a.k * a.k;
  P->phase_len = (wd + 2 * a.padding + a.stride - 1) / a.stride;
  // Bands of output rows amortise the input-row copies over up to 8 rows; keep >= ~24 work items
  // (when the problem allows) so the thread pool can balance them.
  P->band_rows = std::max<int64_t>(1, std::min<int64_t>(8, n * a.groups * P->ho / 24));
  P->bands = (P->ho + P->band_rows - 1) / P->band_rows;
  P->scratch_rows = (P->band_rows - 1) * a.stride + (a.k - 1) * a.dilation + 1;
  return static_cast<size_t>(n * a.groups * P->bands);
}

// ------------------------------------------------------------------------------------------------
// Kernel object and the OrtCustomOp callbacks
// ------------------------------------------------------------------------------------------------

struct Kernel {
  Attrs attrs;
};

OrtStatus* ReadIntAttr(const OrtKernelInfo* info, const char* name, int64_t* out, bool required) {
  OrtStatus* st = g_api->KernelInfoGetAttribute_int64(info, name, out);
  if (st == nullptr) return nullptr;
  g_api->ReleaseStatus(st);
  if (required) return Fail(std::string("missing required int attribute '") + name + "'");
  return nullptr;
}

OrtStatus* ORT_API_CALL CreateKernelV2(const OrtCustomOp*, const OrtApi*, const OrtKernelInfo* info,
                                       void** kernel) noexcept {
  try {
    Attrs a;
    RETURN_IF_ERROR(ReadIntAttr(info, "kernel_size", &a.k, true));
    RETURN_IF_ERROR(ReadIntAttr(info, "stride", &a.stride, false));
    RETURN_IF_ERROR(ReadIntAttr(info, "dilation", &a.dilation, false));
    RETURN_IF_ERROR(ReadIntAttr(info, "groups", &a.groups, false));
    a.padding = a.dilation * (a.k - 1) / 2;
    RETURN_IF_ERROR(ReadIntAttr(info, "padding", &a.padding, false));
    RETURN_IF_ERROR(ValidateAttrs(a));
    *kernel = new Kernel{a};
    return nullptr;
  } catch (const std::exception& e) {
    return Fail(e.what(), ORT_FAIL);
  } catch (...) {
    return Fail("unknown error creating kernel", ORT_FAIL);
  }
}

void ORT_API_CALL KernelDestroy(void* kernel) noexcept { delete static_cast<Kernel*>(kernel); }

OrtStatus* GetShape(const OrtValue* v, const char* what, ONNXTensorElementDataType* type,
                    std::vector<int64_t>* dims) {
  OrtTensorTypeAndShapeInfo* info = nullptr;
  RETURN_IF_ERROR(g_api->GetTensorTypeAndShape(v, &info));
  size_t rank = 0;
  OrtStatus* st = g_api->GetDimensionsCount(info, &rank);
  if (st == nullptr) {
    dims->assign(rank, 0);
    st = g_api->GetDimensions(info, dims->data(), rank);
  }
  if (st == nullptr) st = g_api->GetTensorElementType(info, type);
  g_api->ReleaseTensorTypeAndShapeInfo(info);
  if (st != nullptr) return st;
  if (*type != ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT) return Fail(std::string(what) + " must be float32");
  if (rank != 4) return Fail(std::string(what) + " must be 4-D, got shape " + ShapeStr(dims->data(), rank));
  return nullptr;
}

OrtStatus* ORT_API_CALL KernelComputeV2(void* kernel_ptr, OrtKernelContext* ctx) noexcept {
  try {
    const Attrs& a = static_cast<Kernel*>(kernel_ptr)->attrs;
    const OrtValue* xv = nullptr;
    const OrtValue* wv = nullptr;
    RETURN_IF_ERROR(g_api->KernelContext_GetInput(ctx, 0, &xv));
    RETURN_IF_ERROR(g_api->KernelContext_GetInput(ctx, 1, &wv));
    if (xv == nullptr || wv == nullptr) return Fail("expects 2 inputs (X, W)");
    ONNXTensorElementDataType xt, wt;
    std::vector<int64_t> xd, wd;
    RETURN_IF_ERROR(GetShape(xv, "input X", &xt, &xd));
    RETURN_IF_ERROR(GetShape(wv, "input W (kernel)", &wt, &wd));
    const int64_t N = xd[0], C = xd[1], H = xd[2], Wd = xd[3];
    if (C % a.groups != 0)
      return Fail("channels (" + std::to_string(C) + ") not divisible by groups (" + std::to_string(a.groups) + ")");
    const int64_t Ho = OutExtent(H, a), Wo = OutExtent(Wd, a);
    const int64_t expect[4] = {N, a.groups * a.k * a.k, Ho, Wo};
    if (wd[0] != expect[0] || wd[1] != expect[1] || wd[2] != expect[2] || wd[3] != expect[3])
      return Fail("kernel shape must be (N, G*K*K, Ho, Wo) = " + ShapeStr(expect, 4) + " for X " +
                  ShapeStr(xd.data(), 4) + ", got " + ShapeStr(wd.data(), 4));

    const int64_t yd[4] = {N, C, Ho, Wo};
    OrtValue* yv = nullptr;
    RETURN_IF_ERROR(g_api->KernelContext_GetOutput(ctx, 0, yd, 4, &yv));
    if (N * C * Ho * Wo == 0) return nullptr;

    const void* xp = nullptr;
    const void* wp = nullptr;
    void* yp = nullptr;
    RETURN_IF_ERROR(g_api->GetTensorMutableData(const_cast<OrtValue*>(xv), const_cast<void**>(&xp)));
    RETURN_IF_ERROR(g_api->GetTensorMutableData(const_cast<OrtValue*>(wv), const_cast<void**>(&wp)));
    RETURN_IF_ERROR(g_api->GetTensorMutableData(yv, &yp));

    Problem P;
    const size_t total = SetUp(&P, static_cast<const float*>(xp), static_cast<const float*>(wp),
                               static_cast<float*>(yp), N, C, H, Wd, a);
    RETURN_IF_ERROR(g_api->KernelContext_ParallelFor(ctx, RunTask, total, 0, &P));
    if (P.failed.load()) return Fail("out of memory in a worker", ORT_FAIL);
    return nullptr;
  } catch (const std::exception& e) {
    return Fail(e.what(), ORT_FAIL);
  } catch (...) {
    return Fail("unknown error in compute", ORT_FAIL);
  }
}

// Output shape inference: Y = (N, C) of X and (Ho, Wo) of W, or computed from X when W's are unknown.
struct Dim {
  int64_t value = -1;
  std::string sym;
};

OrtStatus* InputDims(OrtShapeInferContext* ctx, size_t i, std::vector<Dim>* out, bool* known) {
  OrtTensorTypeAndShapeInfo* info = nullptr;  // owned by the context
  RETURN_IF_ERROR(g_api->ShapeInferContext_GetInputTypeShape(ctx, i, &info));
  size_t rank = 0;
  RETURN_IF_ERROR(g_api->GetDimensionsCount(info, &rank));
  *known = rank != 0;
  out->assign(rank, Dim{});
  if (rank == 0) return nullptr;
  std::vector<int64_t> v(rank);
  std::vector<const char*> names(rank, nullptr);
  RETURN_IF_ERROR(g_api->GetDimensions(info, v.data(), rank));
  RETURN_IF_ERROR(g_api->GetSymbolicDimensions(info, names.data(), rank));
  for (size_t k = 0; k < rank; ++k) {
    (*out)[k].value = v[k];
    if (names[k] != nullptr) (*out)[k].sym = names[k];
  }
  return nullptr;
}

OrtStatus* ReadShapeAttr(OrtShapeInferContext* ctx, const char* name, int64_t* value) {
  const OrtOpAttr* attr = nullptr;
  OrtStatus* st = g_api->ShapeInferContext_GetAttribute(ctx, name, &attr);
  if (st != nullptr) {  // absent: keep the default
    g_api->ReleaseStatus(st);
    return nullptr;
  }
  if (attr == nullptr) return nullptr;
  size_t written = 0;
  return g_api->ReadOpAttr(attr, ORT_OP_ATTR_INT, value, sizeof(int64_t), &written);
}

OrtStatus* ORT_API_CALL InferOutputShape(const OrtCustomOp*, OrtShapeInferContext* ctx) noexcept {
  try {
    Attrs a;
    a.k = 1;
    RETURN_IF_ERROR(ReadShapeAttr(ctx, "kernel_size", &a.k));
    RETURN_IF_ERROR(ReadShapeAttr(ctx, "stride", &a.stride));
    RETURN_IF_ERROR(ReadShapeAttr(ctx, "dilation", &a.dilation));
    RETURN_IF_ERROR(ReadShapeAttr(ctx, "groups", &a.groups));
    a.padding = a.dilation * (a.k - 1) / 2;
    RETURN_IF_ERROR(ReadShapeAttr(ctx, "padding", &a.padding));
    RETURN_IF_ERROR(ValidateAttrs(a));

    std::vector<Dim> x, w;
    bool x_known = false, w_known = false;
    RETURN_IF_ERROR(InputDims(ctx, 0, &x, &x_known));
    RETURN_IF_ERROR(InputDims(ctx, 1, &w, &w_known));
    if (x_known && x.size() != 4) return Fail("input X must be 4-D, got rank " + std::to_string(x.size()));
    if (w_known && w.size() != 4) return Fail("input W must be 4-D, got rank " + std::to_string(w.size()));
    std::vector<Dim> y(4);
    if (x_known) {
      y[0] = x[0];
      y[1] = x[1];
      for (int k = 2; k < 4; ++k)
        if (x[k].value >= 0) y[k].value = OutExtent(x[k].value, a);
      if (x[1].value >= 0 && x[1].value % a.groups != 0)
        return Fail("channels (" + std::to_string(x[1].value) + ") not divisible by groups (" +
                    std::to_string(a.groups) + ")");
    }
    if (w_known) {
      const int64_t gkk = a.groups * a.k * a.k;
      if (w[1].value >= 0 && w[1].value != gkk)
        return Fail("kernel must have G*K*K = " + std::to_string(gkk) + " channels, got " +
                    std::to_string(w[1].value));
      for (int k = 2; k < 4; ++k) {
        if (w[k].value >= 0 && y[k].value >= 0 && w[k].value != y[k].value)
          return Fail("kernel spatial size " + std::to_string(w[k].value) + " != output size " +
                      std::to_string(y[k].value));
        if (y[k].value < 0) y[k] = w[k];
      }
      if (y[0].value < 0 && y[0].sym.empty()) y[0] = w[0];
    }
    OrtTensorTypeAndShapeInfo* info = nullptr;
    RETURN_IF_ERROR(g_api->CreateTensorTypeAndShapeInfo(&info));
    int64_t dims[4];
    const char* names[4];
    for (int k = 0; k < 4; ++k) {
      dims[k] = y[k].value;
      names[k] = y[k].sym.c_str();
    }
    OrtStatus* st = g_api->SetTensorElementType(info, ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT);
    if (st == nullptr) st = g_api->SetDimensions(info, dims, 4);
    if (st == nullptr) st = g_api->SetSymbolicDimensions(info, names, 4);
    if (st == nullptr) st = g_api->ShapeInferContext_SetOutputTypeShape(ctx, 0, info);
    g_api->ReleaseTensorTypeAndShapeInfo(info);
    return st;
  } catch (const std::exception& e) {
    return Fail(e.what(), ORT_FAIL);
  } catch (...) {
    return Fail("unknown error in shape inference", ORT_FAIL);
  }
}

const char* ORT_API_CALL GetName(const OrtCustomOp*) noexcept { return kOpName; }
const char* ORT_API_CALL GetExecutionProviderType(const OrtCustomOp*) noexcept { return "CPUExecutionProvider"; }
ONNXTensorElementDataType ORT_API_CALL GetType(const OrtCustomOp*, size_t) noexcept {
  return ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT;
}
size_t ORT_API_CALL GetInputTypeCount(const OrtCustomOp*) noexcept { return 2; }
size_t ORT_API_CALL GetOutputTypeCount(const OrtCustomOp*) noexcept { return 1; }
OrtCustomOpInputOutputCharacteristic ORT_API_CALL GetCharacteristic(const OrtCustomOp*, size_t) noexcept {
  return INPUT_OUTPUT_REQUIRED;
}
OrtMemType ORT_API_CALL GetInputMemoryType(const OrtCustomOp*, size_t) noexcept { return OrtMemTypeDefault; }
int ORT_API_CALL GetVariadicMinArity(const OrtCustomOp*) noexcept { return 1; }
int ORT_API_CALL GetVariadicHomogeneity(const OrtCustomOp*) noexcept { return 1; }
int ORT_API_CALL GetStartVersion(const OrtCustomOp*) noexcept { return 1; }
int ORT_API_CALL GetEndVersion(const OrtCustomOp*) noexcept { return 1; }  // matches the schema's version

OrtCustomOp MakeOp() {
  OrtCustomOp op;
  std::memset(&op, 0, sizeof(op));
  op.version = kApiVersion;  // ORT reads only the fields that existed in this API version
  op.CreateKernel = nullptr;
  op.GetName = GetName;
  op.GetExecutionProviderType = GetExecutionProviderType;
  op.GetInputType = GetType;
  op.GetInputTypeCount = GetInputTypeCount;
  op.GetOutputType = GetType;
  op.GetOutputTypeCount = GetOutputTypeCount;
  op.KernelCompute = nullptr;
  op.KernelDestroy = KernelDestroy;
  op.GetInputCharacteristic = GetCharacteristic;
  op.GetOutputCharacteristic = GetCharacteristic;
  op.GetInputMemoryType = GetInputMemoryType;
  op.GetVariadicInputMinArity = GetVariadicMinArity;
  op.GetVariadicInputHomogeneity = GetVariadicHomogeneity;
  op.GetVariadicOutputMinArity = GetVariadicMinArity;
  op.GetVariadicOutputHomogeneity = GetVariadicHomogeneity;
  op.CreateKernelV2 = CreateKernelV2;
  op.KernelComputeV2 = KernelComputeV2;
  op.InferOutputShapeFn = InferOutputShape;
  op.GetStartVersion = GetStartVersion;
  op.GetEndVersion = GetEndVersion;
  return op;
}

const OrtCustomOp g_op = MakeOp();

// Domains must outlive every session created from the options they were added to; ORT does not
// take ownership. Keep them for the life of the library and release them when it is unloaded.
struct DomainStore {
  std::mutex mu;
  std::vector<OrtCustomOpDomain*> domains;
  ~DomainStore() {
    if (g_api == nullptr) return;
    for (OrtCustomOpDomain* d : domains) g_api->ReleaseCustomOpDomain(d);
  }
};
DomainStore g_domains;

}  // namespace

extern "C" __attribute__((visibility("default"))) OrtStatus* ORT_API_CALL
RegisterCustomOps(OrtSessionOptions* options, const OrtApiBase* api_base) noexcept {
  if (api_base == nullptr) return nullptr;
  const OrtApi* api = api_base->GetApi(kApiVersion);
  if (api == nullptr) return nullptr;  // ORT older than 1.17: nothing registered, the function runs
  g_api = api;
  try {
    OrtCustomOpDomain* domain = nullptr;
    RETURN_IF_ERROR(api->CreateCustomOpDomain(kDomain, &domain));
    OrtStatus* st = api->CustomOpDomain_Add(domain, &g_op);
    if (st == nullptr) st = api->AddCustomOpDomain(options, domain);
    if (st != nullptr) {
      api->ReleaseCustomOpDomain(domain);
      return st;
    }
    std::lock_guard<std::mutex> lock(g_domains.mu);
    g_domains.domains.push_back(domain);
    return nullptr;
  } catch (...) {
    return api->CreateStatus(ORT_FAIL, "Involution: failed to register the custom-op domain");
  }
}

// Plain C entry point for repconv's PyTorch op (loaded with ctypes; no ONNX Runtime involved), so
// torch and ORT share one kernel. Arguments are validated by the Python caller; the checks here
// only keep a bad call from touching memory. Threads: std::thread workers pulling work items.
// Returns 0 on success, 1 bad arguments, 2 out of memory, 3 other failure.
extern "C" __attribute__((visibility("default"))) int repconv_involution_f32(
    const float* x, const float* w, float* y, const int64_t* dims, const int64_t* attrs, int threads) noexcept {
  try {
    if (x == nullptr || w == nullptr || y == nullptr || dims == nullptr || attrs == nullptr) return 1;
    Attrs a;
    a.k = attrs[0];
    a.stride = attrs[1];
    a.dilation = attrs[2];
    a.groups = attrs[3];
    a.padding = a.dilation * (a.k - 1) / 2;
    const int64_t n = dims[0], c = dims[1], h = dims[2], wd = dims[3];
    if (a.k < 1 || a.k % 2 == 0 || a.k > 255 || a.stride < 1 || a.dilation < 1 || a.groups < 1) return 1;
    if (n < 0 || c < 0 || h < 1 || wd < 1 || c % a.groups != 0) return 1;
    if (n * c == 0) return 0;
    Problem P;
    const size_t total = SetUp(&P, x, w, y, n, c, h, wd, a);
    std::atomic<size_t> next{0};
    auto worker = [&P, &next, total]() noexcept {
      for (size_t t = next.fetch_add(1); t < total; t = next.fetch_add(1)) RunTask(&P, t);
    };
    std::vector<std::thread> pool;
    const size_t want = std::min<size_t>(total, static_cast<size_t>(std::max(threads, 1))) - 1;
    try {
      pool.reserve(want);
      for (size_t i = 0; i < want; ++i) pool.emplace_back(worker);
    } catch (...) {  // could not start more threads: the ones running (and this one) finish the work
    }
    worker();
    for (std::thread& t : pool) t.join();
    return P.failed.load() ? 2 : 0;
  } catch (...) {
    return 3;
  }
}
