// y = x @ W^T for a read-only fp32 weight stored in 16-column panels, for the few rows of a decode step.
//
// At 8 rows a matrix product is a stream of weights: each weight is used for 8 multiply-adds and never
// again in that step, so its speed is the speed of reading the weight from memory. oneDNN and MKL read it
// at about two thirds of the rate a plain sum reaches on these CPUs. Here the weight is laid out so that
// one thread reads one contiguous stream: panel p holds W's columns 16p..16p+15 as K rows of 16 floats,
// each row one AVX-512 register, multiplied into 8 accumulators (one per row of x). A software prefetch
// 4 KiB ahead keeps the stream going across page boundaries, where the hardware prefetcher stops.
//
// More rows (a prompt's prefill) run in blocks of 6 over 3-4 panels at a time, so a panel is read from
// memory once and from cache for every further block.

#include <ATen/Parallel.h>
#include <cmath>
#include <limits>
#include <vector>
#include <immintrin.h>
#include <torch/extension.h>

namespace {

constexpr int64_t kPanel = 16;       // columns per panel: one AVX-512 register of floats
constexpr int64_t kPrefetch = 1024;  // floats ahead of the current panel row (4 KiB)
// Tiles: up to 8 rows x 2 panels where the weights stream from memory (a decode step's few rows); 6 rows x
// 3-4 panels where they are reused from cache for many rows (a prefill), so each load feeds more products.
constexpr int64_t kStreamRows = 8, kStreamPanels = 2, kReuseRows = 6, kReusePanels = 4;

// Rows x (16 * Panels) outputs: Panels weight streams side by side, each register of weights used Rows times.
template <int Rows, int Panels, bool Stream>
void panel_tile(const float* x, const float* panel, float* y, int64_t K, int64_t N) {
  __m512 acc[Panels][Rows];
  for (int j = 0; j < Panels; ++j)
    for (int r = 0; r < Rows; ++r) acc[j][r] = _mm512_setzero_ps();
  for (int64_t k = 0; k < K; ++k) {
    __m512 w[Panels];
    for (int j = 0; j < Panels; ++j) {
      const float* row = panel + j * K * kPanel + k * kPanel;
      if (Stream) _mm_prefetch(reinterpret_cast<const char*>(row + kPrefetch), _MM_HINT_T0);
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

template <int Panels, bool Stream>
void panel_rows(const float* x, const float* panel, float* y, int64_t rows, int64_t K, int64_t N) {
  switch (rows) {
    case 8: return panel_tile<8, Panels, Stream>(x, panel, y, K, N);
    case 7: return panel_tile<7, Panels, Stream>(x, panel, y, K, N);
    case 6: return panel_tile<6, Panels, Stream>(x, panel, y, K, N);
    case 5: return panel_tile<5, Panels, Stream>(x, panel, y, K, N);
    case 4: return panel_tile<4, Panels, Stream>(x, panel, y, K, N);
    case 3: return panel_tile<3, Panels, Stream>(x, panel, y, K, N);
    case 2: return panel_tile<2, Panels, Stream>(x, panel, y, K, N);
    default: return panel_tile<1, Panels, Stream>(x, panel, y, K, N);
  }
}

// Streaming decode rows: pairs of panels, weights prefetched from memory.
void stream_panels(const float* x, const float* panel, float* y, int64_t rows, int64_t panels, int64_t K, int64_t N) {
  if (panels == 2) return panel_rows<2, true>(x, panel, y, rows, K, N);
  return panel_rows<1, true>(x, panel, y, rows, K, N);
}

// Many rows: up to 4 panels at a time, reused from cache for every block of 6 rows.
void reuse_panels(const float* x, const float* panel, float* y, int64_t rows, int64_t panels, int64_t K, int64_t N) {
  for (int64_t r = 0; r < rows; r += kReuseRows) {
    const int64_t block = std::min(kReuseRows, rows - r);
    switch (panels) {
      case 4: panel_rows<4, false>(x + r * K, panel, y + r * N, block, K, N); break;
      case 3: panel_rows<3, false>(x + r * K, panel, y + r * N, block, K, N); break;
      case 2: panel_rows<2, false>(x + r * K, panel, y + r * N, block, K, N); break;
      default: panel_rows<1, false>(x + r * K, panel, y + r * N, block, K, N);
    }
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
  if (rows <= kStreamRows) {
    at::parallel_for(0, (P + kStreamPanels - 1) / kStreamPanels, 1, [&](int64_t first, int64_t last) {
      for (int64_t g = first; g < last; ++g) {
        const int64_t p = g * kStreamPanels;
        stream_panels(xs, ws + p * K * kPanel, ys + p * kPanel, rows, std::min(kStreamPanels, P - p), K, N);
      }
    });
  } else {
    // Compute-bound: as many groups of 3-4 panels as makes every thread's share equal.
    const int64_t threads = at::get_num_threads();
    const int64_t groups = threads * ((P + kReusePanels * threads - 1) / (kReusePanels * threads));
    at::parallel_for(0, groups, 1, [&](int64_t first, int64_t last) {
      for (int64_t g = first; g < last; ++g) {
        const int64_t begin = P * g / groups, end = P * (g + 1) / groups;
        if (end > begin) reuse_panels(xs, ws + begin * K * kPanel, ys + begin * kPanel, rows, end - begin, K, N);
      }
    });
  }
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

// ---- one decode step of a Llama layer ------------------------------------------------------------------
//
// At batch 8 the rest of a layer (two RMSNorms, the rotary embedding, the cache writes, attention over the
// cache, SiLU, two residual adds) is a few thousand multiply-adds: dispatched as ~20 PyTorch operations
// from Python it took about as long as the layer's matrix products. Here it is plain loops around the
// four products, one call per layer.

void rms_norm_rows(const float* x, const float* weight, float* out, int64_t rows, int64_t width, double eps) {
  for (int64_t r = 0; r < rows; ++r) {
    const float* xr = x + r * width;
    float squares = 0.f;
#pragma omp simd reduction(+ : squares)
    for (int64_t i = 0; i < width; ++i) squares += xr[i] * xr[i];
    const float inverse = 1.f / std::sqrt(squares / static_cast<float>(width) + static_cast<float>(eps));
#pragma omp simd
    for (int64_t i = 0; i < width; ++i) out[r * width + i] = xr[i] * inverse * weight[i];
  }
}

// transformers' rotate_half convention: (x1, x2) -> (x1 cos - x2 sin, x2 cos + x1 sin) over the two halves.
void rotate_head(float* head, const float* cos, const float* sin, int64_t dim) {
  const int64_t half = dim / 2;
  for (int64_t i = 0; i < half; ++i) {
    const float first = head[i], second = head[i + half];
    head[i] = first * cos[i] - second * sin[i];
    head[i + half] = second * cos[i + half] + first * sin[i + half];
  }
}

// out[b, h] = softmax(scale * q[b, h] . keys[b, h / group, :length] + bias[b, :length]) @ values[...]:
// the query heads sharing a key/value head read that head's cache once, together.
void attend_cache(const float* q, const float* keys, const float* values, const float* bias, float* out,
                  int64_t batch, int64_t heads, int64_t kv_heads, int64_t dim, int64_t capacity, int64_t length,
                  int64_t bias_stride, double scale) {
  const int64_t group = heads / kv_heads;
  at::parallel_for(0, batch * kv_heads, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> scores(group * length);
    for (int64_t item = begin; item < end; ++item) {
      const int64_t b = item / kv_heads, kv = item % kv_heads;
      const float* k_cache = keys + (b * kv_heads + kv) * capacity * dim;
      const float* v_cache = values + (b * kv_heads + kv) * capacity * dim;
      const float* queries = q + (b * heads + kv * group) * dim;
      for (int64_t l = 0; l < length; ++l) {
        const float* key = k_cache + l * dim;
        for (int64_t g = 0; g < group; ++g) {
          float dot = 0.f;
#pragma omp simd reduction(+ : dot)
          for (int64_t i = 0; i < dim; ++i) dot += queries[g * dim + i] * key[i];
          scores[g * length + l] = dot * static_cast<float>(scale) + bias[b * bias_stride + l];
        }
      }
      for (int64_t g = 0; g < group; ++g) {
        float* row = scores.data() + g * length;
        float top = -std::numeric_limits<float>::infinity();
        for (int64_t l = 0; l < length; ++l) top = std::max(top, row[l]);
        float total = 0.f;
        for (int64_t l = 0; l < length; ++l) total += (row[l] = std::exp(row[l] - top));
        for (int64_t l = 0; l < length; ++l) row[l] /= total;
      }
      float* result = out + (b * heads + kv * group) * dim;
      std::fill(result, result + group * dim, 0.f);
      for (int64_t l = 0; l < length; ++l) {
        const float* value = v_cache + l * dim;
        for (int64_t g = 0; g < group; ++g) {
          const float p = scores[g * length + l];
#pragma omp simd
          for (int64_t i = 0; i < dim; ++i) result[g * dim + i] += p * value[i];
        }
      }
    }
  });
}

// x [B, width] (updated in place) through one Llama layer for one new token per row, whose key and value
// go to cache slot `slot`; key_bias [B, >= slot + 1] is 0 where a cached key is visible and -inf where not.
void decode_layer(at::Tensor& x, const at::Tensor& input_norm, const at::Tensor& qkv, const at::Tensor& o,
                  const at::Tensor& post_norm, const at::Tensor& gate_up, const at::Tensor& down, const at::Tensor& cos,
                  const at::Tensor& sin, at::Tensor& keys, at::Tensor& values, const at::Tensor& key_bias, int64_t slot,
                  int64_t heads, int64_t kv_heads, double eps, double scale) {
  TORCH_CHECK(x.is_contiguous() && keys.is_contiguous() && values.is_contiguous() && key_bias.stride(1) == 1,
              "decode_layer: x, keys and values must be contiguous");
  const int64_t batch = x.size(0), width = x.size(1), dim = keys.size(3), capacity = keys.size(2);
  const int64_t q_width = heads * dim, kv_width = kv_heads * dim, inner = down.size(1);
  float* xs = x.mutable_data_ptr<float>();
  at::Tensor h = at::empty_like(x);
  rms_norm_rows(xs, input_norm.const_data_ptr<float>(), h.mutable_data_ptr<float>(), batch, width, eps);

  at::Tensor projected = panel_linear(h, qkv);  // [B, >= q_width + 2 kv_width]
  float* qkv_rows = projected.mutable_data_ptr<float>();
  const int64_t qkv_stride = projected.size(1);
  float* k_cache = keys.mutable_data_ptr<float>();
  float* v_cache = values.mutable_data_ptr<float>();
  at::Tensor queries = at::empty({batch, q_width}, x.options());
  float* q_rows = queries.mutable_data_ptr<float>();
  for (int64_t b = 0; b < batch; ++b) {
    float* row = qkv_rows + b * qkv_stride;
    const float* c = cos.const_data_ptr<float>() + b * dim;
    const float* s = sin.const_data_ptr<float>() + b * dim;
    for (int64_t head = 0; head < heads + kv_heads; ++head) rotate_head(row + head * dim, c, s, dim);
    std::copy(row, row + q_width, q_rows + b * q_width);
    for (int64_t kv = 0; kv < kv_heads; ++kv) {
      const int64_t at_slot = ((b * kv_heads + kv) * capacity + slot) * dim;
      std::copy(row + q_width + kv * dim, row + q_width + (kv + 1) * dim, k_cache + at_slot);
      std::copy(row + q_width + kv_width + kv * dim, row + q_width + kv_width + (kv + 1) * dim, v_cache + at_slot);
    }
  }

  at::Tensor attended = at::empty({batch, q_width}, x.options());
  attend_cache(q_rows, k_cache, v_cache, key_bias.const_data_ptr<float>(), attended.mutable_data_ptr<float>(), batch,
               heads, kv_heads, dim, capacity, slot + 1, key_bias.stride(0), scale);
  at::Tensor mixed = panel_linear(attended, o);
  const int64_t o_stride = mixed.size(1);
  const float* mixed_rows = mixed.const_data_ptr<float>();
  for (int64_t b = 0; b < batch; ++b)
    for (int64_t i = 0; i < width; ++i) xs[b * width + i] += mixed_rows[b * o_stride + i];

  rms_norm_rows(xs, post_norm.const_data_ptr<float>(), h.mutable_data_ptr<float>(), batch, width, eps);
  at::Tensor gates = panel_linear(h, gate_up);  // [B, >= 2 inner]: gate, then up
  // ATen's SiLU: its exp is vectorised, where a loop here would call the scalar one 12k times a layer.
  at::Tensor activated = at::silu(gates.narrow(1, 0, inner)).mul_(gates.narrow(1, inner, inner));
  at::Tensor out = panel_linear(activated, down);
  const int64_t out_stride = out.size(1);
  const float* out_rows = out.const_data_ptr<float>();
  for (int64_t b = 0; b < batch; ++b)
    for (int64_t i = 0; i < width; ++i) xs[b * width + i] += out_rows[b * out_stride + i];
}

}  // namespace

TORCH_LIBRARY(rlhf, m) {
  m.def("panel_linear(Tensor x, Tensor panels) -> Tensor");
  m.def("pack_panels(Tensor weight, Tensor(a!) panels, int first, Tensor? lora_b, Tensor? lora_a, float scale) -> ()");
  m.def(
      "decode_layer(Tensor(a!) x, Tensor input_norm, Tensor qkv, Tensor o, Tensor post_norm, Tensor gate_up, "
      "Tensor down, Tensor cos, Tensor sin, Tensor(b!) keys, Tensor(c!) values, Tensor key_bias, int slot, "
      "int heads, int kv_heads, float eps, float scale) -> ()");
}
TORCH_LIBRARY_IMPL(rlhf, CPU, m) {
  m.impl("panel_linear", panel_linear);
  m.impl("pack_panels", pack_panels);
  m.impl("decode_layer", decode_layer);
}
