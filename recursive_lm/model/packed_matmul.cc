// y = x @ W for a few rows of x against a weight packed ahead of time, as an
// XLA:CPU custom call (built and registered by recursive_lm/model/native.py).
//
//   x [M, K] float32, rows contiguous
//   p [T, K, 32] float32: W [K, N] cut into T = ceil(N / 32) column tiles,
//     tile t holding W[:, 32t : 32t + 32] row after row (zeros past column N)
//   y [M, N] float32
//
// A decode step multiplies a few token rows by every weight of the model, so
// its time is the time to read the weights once. XLA:CPU hands such a product
// to a library GEMM that re-packs W on every call, or to its own vector loop;
// on Gemma 3 270M both read the weights at 9-15 GB/s on a 2-core CPU. Here the
// packing is done once (native.pack), each tile is one contiguous 80 KB run
// for K = 640, and the loop below streams it with software prefetch into L2
// 8 KB ahead, holding up to 8 x 32 outputs in registers: 22 GB/s at 8 rows
// and 27.7 GB/s at one row on the same machine (2 KB ahead into L1: 21.8 and
// 26.4). Rows beyond 8 are taken 8 at a time over the same tile (then in
// cache).
//
// The vector type is GCC's generic vector extension: -march=native turns it
// into AVX-512 (one register per 16 floats) or pairs of AVX2 registers.
// Tiles are shared out in chunks over XLA's intra-op thread pool; the calling
// thread takes chunks too, so it never waits on a task that has not started
// (a late task finds no chunk left and returns).
#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstring>
#include <memory>
#include <thread>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

constexpr int64_t kTile = 32;          // output columns per tile
constexpr int64_t kAhead = 64;         // tile rows prefetched ahead (64 x 128 bytes)
constexpr int64_t kChunksPerThread = 16;  // small chunks even out threads that start late

typedef float Vec __attribute__((vector_size(64)));  // 16 floats; must stay 64-byte aligned (registers)

template <int M>
void Tile(const float* x, int64_t k_dim, const float* tile, float* y, int64_t n_dim, int64_t width) {
  Vec acc[M][2];
  for (int m = 0; m < M; ++m) acc[m][0] = acc[m][1] = Vec{};
  for (int64_t k = 0; k < k_dim; ++k) {
    // Into L2 (locality 2). A prefetch never faults, so reaching past the last tile is harmless.
    __builtin_prefetch(tile + (k + kAhead) * kTile, 0, 2);
    __builtin_prefetch(tile + (k + kAhead) * kTile + 16, 0, 2);
    Vec w0, w1;  // memcpy: the buffer need not be 64-byte aligned
    std::memcpy(&w0, tile + k * kTile, sizeof(Vec));
    std::memcpy(&w1, tile + k * kTile + 16, sizeof(Vec));
    for (int m = 0; m < M; ++m) {
      const float xv = x[m * k_dim + k];
      acc[m][0] += w0 * xv;
      acc[m][1] += w1 * xv;
    }
  }
  for (int m = 0; m < M; ++m) {
    float out[kTile];
    std::memcpy(out, &acc[m][0], sizeof(Vec));
    std::memcpy(out + 16, &acc[m][1], sizeof(Vec));
    std::memcpy(y + m * n_dim, out, width * sizeof(float));
  }
}

using TileFn = void (*)(const float*, int64_t, const float*, float*, int64_t, int64_t);
constexpr TileFn kTiles[8] = {Tile<1>, Tile<2>, Tile<3>, Tile<4>, Tile<5>, Tile<6>, Tile<7>, Tile<8>};

struct Progress {  // shared by the caller and the tasks it schedules
  std::atomic<int64_t> next{0};
  std::atomic<int64_t> done{0};
};

ffi::Error PackedMatmul(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> p,
                        ffi::ResultBuffer<ffi::F32> y) {
  const auto xd = x.dimensions(), pd = p.dimensions(), yd = y->dimensions();
  if (xd.size() != 2 || pd.size() != 3 || yd.size() != 2 || pd[2] != kTile || pd[1] != xd[1] || yd[0] != xd[0] ||
      yd[1] > pd[0] * kTile || yd[1] <= (pd[0] - 1) * kTile) {
    return ffi::Error::InvalidArgument("packed_matmul: needs x [M, K], p [ceil(N/32), K, 32] and y [M, N]");
  }
  const int64_t rows = xd[0], k_dim = xd[1], n_dim = yd[1], tiles = pd[0];
  if (rows == 0) return ffi::Error::Success();
  const float* xp = x.typed_data();
  const float* pp = p.typed_data();
  float* yp = y->typed_data();
  const int64_t threads = std::max<int64_t>(1, pool.num_threads());
  const int64_t chunks = std::min(tiles, threads * kChunksPerThread);
  auto progress = std::make_shared<Progress>();
  auto run = [=]() {
    for (int64_t c; (c = progress->next.fetch_add(1)) < chunks;) {
      for (int64_t t = c * tiles / chunks; t < (c + 1) * tiles / chunks; ++t) {
        const int64_t width = std::min(kTile, n_dim - t * kTile);
        for (int64_t r = 0; r < rows; r += 8) {
          kTiles[std::min<int64_t>(8, rows - r) - 1](xp + r * k_dim, k_dim, pp + t * k_dim * kTile,
                                                     yp + r * n_dim + t * kTile, n_dim, width);
        }
      }
      progress->done.fetch_add(1, std::memory_order_release);
    }
  };
  for (int64_t i = 1; i < std::min(threads, chunks); ++i) pool.Schedule([run] { run(); });
  run();
  while (progress->done.load(std::memory_order_acquire) < chunks) std::this_thread::yield();
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(PackedMatmulHandler, PackedMatmul,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());
