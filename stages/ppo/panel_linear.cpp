// y = x @ W^T for a read-only fp32 weight stored in 16-column panels, for the few rows of a decode step.
//
// At 8 rows a matrix product is a stream of weights: each weight is used for 8 multiply-adds and never
// again in that step, so its speed is the speed of reading the weight from memory. oneDNN and MKL read it
// at about two thirds of the rate a plain sum reaches on these CPUs. Here the weight is laid out so that
// one thread reads one contiguous stream: panel p holds W's columns 16p..16p+15 as K rows of 16 floats,
// each row one AVX-512 register, multiplied into 8 accumulators (one per row of x). A software prefetch
// 4 KiB ahead keeps the stream going across page boundaries, where the hardware prefetcher stops.
//
// More rows (a prompt's prefill) run in blocks of 8 inside each panel, so a panel is read from memory
// once and from cache for every further block.

#include <ATen/Parallel.h>
#include <immintrin.h>
#include <torch/extension.h>

namespace {

constexpr int64_t kPanel = 16;         // columns per panel: one AVX-512 register of floats
constexpr int64_t kRowBlock = 8;       // rows of x per pass over a panel
constexpr int64_t kPrefetch = 1024;    // floats ahead of the current panel row (4 KiB)

// Rows x (16 * Panels) outputs: Panels weight streams side by side, each register of weights used Rows times.
template <int Rows, int Panels>
void panel_tile(const float* x, const float* panel, float* y, int64_t K, int64_t N) {
  __m512 acc[Panels][Rows];
  for (int j = 0; j < Panels; ++j)
    for (int r = 0; r < Rows; ++r) acc[j][r] = _mm512_setzero_ps();
  for (int64_t k = 0; k < K; ++k) {
    __m512 w[Panels];
    for (int j = 0; j < Panels; ++j) {
      const float* row = panel + j * K * kPanel + k * kPanel;
      _mm_prefetch(reinterpret_cast<const char*>(row + kPrefetch), _MM_HINT_T0);
      w[j] = _mm512_loadu_ps(row);
    }
    for (int r = 0; r < Rows; ++r) {
      const __m512 xr = _mm512_set1_ps(x[r * K + k]);
      for (int j = 0; j < Panels; ++j) acc[j][r] = _mm512_fmadd_ps(xr, w[j], acc[j][r]);
    }
  }
  for (int j = 0; j < Panels; ++j)
    for (int r = 0; r < Rows; ++r) _mm512_storeu_ps(y + r * N + j * kPanel, acc[j][r]);
}

template <int Panels>
void panel_rows(const float* x, const float* panel, float* y, int64_t rows, int64_t K, int64_t N) {
  switch (rows) {
    case 8: return panel_tile<8, Panels>(x, panel, y, K, N);
    case 7: return panel_tile<7, Panels>(x, panel, y, K, N);
    case 6: return panel_tile<6, Panels>(x, panel, y, K, N);
    case 5: return panel_tile<5, Panels>(x, panel, y, K, N);
    case 4: return panel_tile<4, Panels>(x, panel, y, K, N);
    case 3: return panel_tile<3, Panels>(x, panel, y, K, N);
    case 2: return panel_tile<2, Panels>(x, panel, y, K, N);
    default: return panel_tile<1, Panels>(x, panel, y, K, N);
  }
}

// x [..., K] float32, panels [N / 16, K, 16] float32 -> [..., N]
at::Tensor panel_linear(const at::Tensor& x, const at::Tensor& panels) {
  TORCH_CHECK(x.scalar_type() == at::kFloat && panels.scalar_type() == at::kFloat, "panel_linear: float32 only");
  TORCH_CHECK(panels.dim() == 3 && panels.size(2) == kPanel && panels.is_contiguous(), "panel_linear: panels must be [N/16, K, 16]");
  const int64_t K = x.size(-1), P = panels.size(0), N = P * kPanel;
  TORCH_CHECK(panels.size(1) == K, "panel_linear: x has ", K, " features, the weight ", panels.size(1));
  const at::Tensor rows_x = x.reshape({-1, K}).contiguous();
  const int64_t rows = rows_x.size(0);
  at::Tensor y = at::empty({rows, N}, x.options());
  const float* xs = rows_x.const_data_ptr<float>();
  const float* ws = panels.const_data_ptr<float>();
  float* ys = y.mutable_data_ptr<float>();
  // Work comes in pairs of panels; an odd last panel runs alone.
  at::parallel_for(0, (P + 1) / 2, 1, [&](int64_t first, int64_t last) {
    for (int64_t pair = first; pair < last; ++pair) {
      const int64_t p = 2 * pair;
      const float* panel = ws + p * K * kPanel;
      for (int64_t r = 0; r < rows; r += kRowBlock) {
        const int64_t block = std::min(kRowBlock, rows - r);
        float* out = ys + r * N + p * kPanel;
        if (p + 1 < P) {
          panel_rows<2>(xs + r * K, panel, out, block, K, N);
        } else {
          panel_rows<1>(xs + r * K, panel, out, block, K, N);
        }
      }
    }
  });
  std::vector<int64_t> shape = x.sizes().vec();
  shape.back() = N;
  return y.view(shape);
}

// Writes weight [n, K] (n a multiple of 16) into panels [P, K, 16] from panel `first` on, plus a LoRA
// update scale * B @ A (B [n, r], A [r, K]) when given: the merged weight W + scale * BA is computed one
// panel at a time, straight into its layout, without a merged copy of W in between. Each element of W is
// read once and each of the panels written once.
void pack_panels(const at::Tensor& weight, at::Tensor& panels, int64_t first, const std::optional<at::Tensor>& lora_b,
                 const std::optional<at::Tensor>& lora_a, double scale) {
  TORCH_CHECK(weight.scalar_type() == at::kFloat && panels.scalar_type() == at::kFloat, "pack_panels: float32 only");
  const int64_t n = weight.size(0), K = weight.size(1);
  TORCH_CHECK(n % kPanel == 0 && panels.size(1) == K && (first + n / kPanel) <= panels.size(0) && panels.is_contiguous(),
              "pack_panels: weight [", n, ", ", K, "] does not fit panels ", panels.sizes(), " from panel ", first);
  const at::Tensor source = weight.contiguous();
  const bool lora = lora_b.has_value();
  const at::Tensor b = lora ? lora_b->contiguous() : at::Tensor();
  const at::Tensor a = lora ? lora_a->contiguous() : at::Tensor();
  const int64_t rank = lora ? a.size(0) : 0;
  TORCH_CHECK(!lora || (b.size(0) == n && b.size(1) == rank && a.size(1) == K && b.scalar_type() == at::kFloat &&
                        a.scalar_type() == at::kFloat),
              "pack_panels: LoRA factors do not match the weight");
  const float* w = source.const_data_ptr<float>();
  const float* bs = lora ? b.const_data_ptr<float>() : nullptr;
  const float* as = lora ? a.const_data_ptr<float>() : nullptr;
  float* out = panels.mutable_data_ptr<float>() + first * K * kPanel;
  // Element c of a gather reads row c of the 16 weight rows of a panel.
  const __m512i row_offsets = _mm512_mullo_epi32(_mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0),
                                                 _mm512_set1_epi32(static_cast<int>(K)));
  at::parallel_for(0, n / kPanel, 1, [&](int64_t begin, int64_t end) {
    std::vector<__m512> b_columns(rank);  // column j of B over the panel's 16 rows, times scale
    for (int64_t p = begin; p < end; ++p) {
      const float* rows = w + p * kPanel * K;
      float* panel = out + p * K * kPanel;
      for (int64_t j = 0; j < rank; ++j) {
        alignas(64) float column[kPanel];
        for (int64_t c = 0; c < kPanel; ++c) column[c] = static_cast<float>(scale) * bs[(p * kPanel + c) * rank + j];
        b_columns[j] = _mm512_load_ps(column);
      }
      for (int64_t k = 0; k < K; ++k) {
        __m512 merged = _mm512_i32gather_ps(row_offsets, rows + k, 4);
        for (int64_t j = 0; j < rank; ++j) merged = _mm512_fmadd_ps(_mm512_set1_ps(as[j * K + k]), b_columns[j], merged);
        _mm512_storeu_ps(panel + k * kPanel, merged);
      }
    }
  });
}

}  // namespace

TORCH_LIBRARY(rlhf, m) {
  m.def("panel_linear(Tensor x, Tensor panels) -> Tensor");
  m.def("pack_panels(Tensor weight, Tensor(a!) panels, int first, Tensor? lora_b, Tensor? lora_a, float scale) -> ()");
}
TORCH_LIBRARY_IMPL(rlhf, CPU, m) {
  m.impl("panel_linear", panel_linear);
  m.impl("pack_panels", pack_panels);
}
