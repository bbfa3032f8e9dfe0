// CPU kernels of kvlab.CompressedCache: quantize new tokens into, and decode whole runs out of, the packed
// layouts of kvlab.quant (ggml q4_0 / q4_1 / q8_0 blocks; KIVI 2/4-bit K per channel and V per token), one
// call per run instead of a dozen torch ops.
//
// Every function is bit-identical to its torch reference in kvlab/quant (tested): the same float32
// operations in the same order, compiled with -ffp-contract=off so that no multiply-add is fused, and
// fp16 conversions through c10::Half (round to nearest even, as torch's .half()). The quantizers return
// false, writing nothing, when the input holds a NaN or an Inf (the caller then raises its clean error).
//
// Assumes a little-endian host (x86-64, aarch64). Shapes are (B, H, T, D) with any strides whose last one is 1 (views into preallocated buffers);
// K codes of KIVI are (B, H, D, T*bits/8).
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <c10/util/Half.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <string>
#include <vector>

namespace {

// Error messages are built as one std::string, numbers through std::to_string, and only when a check fails:
// on the CUDA device image (torch 2.11 cu130) an extension that streams a number or an IntArrayRef into
// TORCH_CHECK's ostringstream crashed in libstdc++'s number formatting (segfault) instead of raising
// (KERNEL_NOTES.md, v10 s9-3). TORCH_CHECK with a single std::string argument uses no stream.
inline std::string kv_piece(const char* s) { return s; }
inline std::string kv_piece(const std::string& s) { return s; }
inline std::string kv_piece(int64_t v) { return std::to_string(v); }
inline std::string kv_piece(int v) { return std::to_string(v); }
inline std::string kv_piece(at::ScalarType t) { return c10::toString(t); }
inline std::string kv_piece(at::IntArrayRef a) {
  std::string s = "[";
  for (size_t i = 0; i < a.size(); ++i) s += (i ? ", " : "") + std::to_string(a[i]);
  return s + "]";
}
template <typename... Args>
std::string kv_msg(const Args&... args) {
  std::string s;
  ((s += kv_piece(args)), ...);
  return s;
}
#define KV_CHECK(cond, ...)                                \
  do {                                                     \
    if (!(cond)) TORCH_CHECK(false, kv_msg(__VA_ARGS__));  \
  } while (0)

constexpr int64_t BLOCK = 32;  // ggml block

void check_rows(const at::Tensor& t, const char* name, at::ScalarType dtype) {
  KV_CHECK(t.dim() == 4, name, " must have rank 4, got ", t.dim());
  KV_CHECK(t.scalar_type() == dtype, name, " has dtype ", t.scalar_type(), ", expected ", dtype);
  KV_CHECK(t.size(3) == 0 || t.stride(3) == 1, name, " must be contiguous along its last dim");
  KV_CHECK(t.device().is_cpu(), name, " must be a CPU tensor");
}

// Raw pointer and strides of a rank-4 tensor, read once (Tensor accessors are not free inside loops).
template <typename T>
struct View {
  T* p = nullptr;
  int64_t s0 = 0, s1 = 0, s2 = 0;
  View() = default;
  explicit View(const at::Tensor& t) : p(t.data_ptr<T>()), s0(t.stride(0)), s1(t.stride(1)), s2(t.stride(2)) {}
  T* row(int64_t b, int64_t h, int64_t i) const { return p + b * s0 + h * s1 + i * s2; }
};

void check_input(const at::Tensor& x) {
  KV_CHECK(x.dim() == 4, "x must have rank 4 (B, H, T, D), got ", x.dim());
  KV_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kHalf, "x must be float32 or float16, got ",
              x.scalar_type());
  check_rows(x, "x", x.scalar_type());
}

// The rows of an input x (B, H, T, D) of fp16 or float32, read as float32.
struct InputRows {
  bool is_float;
  int64_t B, H, T, D;
  View<float> f;
  View<at::Half> h;
  explicit InputRows(const at::Tensor& x)
      : is_float(x.scalar_type() == at::kFloat), B(x.size(0)), H(x.size(1)), T(x.size(2)), D(x.size(3)) {
    if (is_float)
      f = View<float>(x);
    else
      h = View<at::Half>(x);
  }
  void load(int64_t b, int64_t hh, int64_t t, float* dst) const {
    if (is_float) {
      const float* src = f.row(b, hh, t);
      for (int64_t j = 0; j < D; ++j) dst[j] = src[j];
    } else {
      const at::Half* src = h.row(b, hh, t);
      for (int64_t j = 0; j < D; ++j) dst[j] = static_cast<float>(src[j]);
    }
  }
  bool all_finite() const {
    std::vector<float> buf(D);
    for (int64_t b = 0; b < B; ++b)
      for (int64_t hh = 0; hh < H; ++hh)
        for (int64_t t = 0; t < T; ++t) {
          load(b, hh, t, buf.data());
          for (int64_t j = 0; j < D; ++j)
            if (!std::isfinite(buf[j])) return false;
        }
    return true;
  }
};

}  // namespace

// ------------------------------------------------------------------------------------------------------
// ggml blocks (kvlab/quant/ggml.py): codes (B, H, T, D/2) for 4 bits (qs[j] = q[j] | q[j+16] << 4 per
// block), (B, H, T, D) int8-as-uint8 for q8_0; scale (and min for q4_1) fp16 (B, H, T, D/32).
// ------------------------------------------------------------------------------------------------------
std::vector<at::Tensor> ggml_quantize(const at::Tensor& x, int64_t nbits, bool asym) {
  check_input(x);
  KV_CHECK(nbits == 4 || nbits == 8, "nbits must be 4 or 8, got ", nbits);
  KV_CHECK(!(asym && nbits == 8), "q8 has no asymmetric format");
  const InputRows X(x);
  const int64_t B = X.B, H = X.H, T = X.T, D = X.D;
  KV_CHECK(D % BLOCK == 0, "head_dim ", D, " is not a multiple of ", BLOCK);
  if (!X.all_finite()) return {};
  const int64_t nb = D / BLOCK;
  auto u8 = at::TensorOptions().dtype(at::kByte);
  auto f16 = at::TensorOptions().dtype(at::kHalf);
  at::Tensor codes = at::empty({B, H, T, nbits == 8 ? D : D / 2}, u8);
  at::Tensor scale = at::empty({B, H, T, nb}, f16);
  at::Tensor mins = asym ? at::empty({B, H, T, nb}, f16) : at::Tensor();
  const View<uint8_t> C(codes);
  const View<at::Half> S(scale);
  const View<at::Half> M = asym ? View<at::Half>(mins) : View<at::Half>();
  at::parallel_for(0, B * H * T, 16, [&](int64_t begin, int64_t end) {
    std::vector<float> xs(D);
    for (int64_t r = begin; r < end; ++r) {
      const int64_t b = r / (H * T), h = (r / T) % H, t = r % T;
      X.load(b, h, t, xs.data());
      uint8_t* c = C.row(b, h, t);
      at::Half* s = S.row(b, h, t);
      at::Half* m = asym ? M.row(b, h, t) : nullptr;
      for (int64_t k = 0; k < nb; ++k) {
        const float* v = xs.data() + k * BLOCK;
        float q[BLOCK];
        float d;
        if (asym) {  // d = (max - min) / 15; q = min(15, trunc((x - min) * id + 0.5))
          float lo = v[0], hi = v[0];
          for (int j = 1; j < BLOCK; ++j) {
            lo = v[j] < lo ? v[j] : lo;
            hi = v[j] > hi ? v[j] : hi;
          }
          d = (hi - lo) / 15.0f;
          const float id = d == 0.0f ? 0.0f : 1.0f / d;
          for (int j = 0; j < BLOCK; ++j) q[j] = std::fmin(std::trunc((v[j] - lo) * id + 0.5f), 15.0f);
          m[k] = at::Half(lo);
        } else if (nbits == 8) {  // d = max|x| / 127; q = roundf(x * id)
          float amax = 0.0f;
          for (int j = 0; j < BLOCK; ++j) amax = std::fabs(v[j]) > amax ? std::fabs(v[j]) : amax;
          d = amax / 127.0f;
          const float id = d == 0.0f ? 0.0f : 1.0f / d;
          for (int j = 0; j < BLOCK; ++j) q[j] = std::round(v[j] * id);
        } else {  // max = first largest |x| with its sign; d = max / -8; q = clamp(trunc(x * id + 8.5), 0, 15)
          float amax = -1.0f, smax = 0.0f;
          for (int j = 0; j < BLOCK; ++j)
            if (std::fabs(v[j]) > amax) {
              amax = std::fabs(v[j]);
              smax = v[j];
            }
          d = smax / -8.0f;
          const float id = d == 0.0f ? 0.0f : 1.0f / d;
          for (int j = 0; j < BLOCK; ++j) q[j] = std::fmin(std::fmax(std::trunc(v[j] * id + 8.5f), 0.0f), 15.0f);
        }
        s[k] = at::Half(d);
        if (nbits == 8) {
          for (int j = 0; j < BLOCK; ++j) c[k * BLOCK + j] = static_cast<uint8_t>(static_cast<int8_t>(q[j]));
        } else {
          for (int j = 0; j < BLOCK / 2; ++j)
            c[k * BLOCK / 2 + j] = static_cast<uint8_t>(
                (static_cast<int>(q[j]) & 15) | ((static_cast<int>(q[j + BLOCK / 2]) & 15) << 4));
        }
      }
    }
  });
  if (asym) return {codes, scale, mins};
  return {codes, scale};
}

void ggml_read(const at::Tensor& codes, const at::Tensor& scale, const c10::optional<at::Tensor>& mins,
               int64_t nbits, at::Tensor out) {
  check_rows(out, "out", at::kFloat);
  check_rows(codes, "codes", at::kByte);
  check_rows(scale, "scale", at::kHalf);
  const bool asym = mins.has_value() && mins->defined();
  if (asym) check_rows(*mins, "min", at::kHalf);
  KV_CHECK(nbits == 4 || nbits == 8, "nbits must be 4 or 8, got ", nbits);
  const int64_t B = out.size(0), H = out.size(1), T = out.size(2), D = out.size(3), nb = D / BLOCK;
  KV_CHECK(D % BLOCK == 0 && codes.size(0) == B && codes.size(1) == H && codes.size(2) == T &&
                  codes.size(3) == (nbits == 8 ? D : D / 2) && scale.size(0) == B && scale.size(1) == H &&
                  scale.size(2) == T && scale.size(3) == nb && (!asym || mins->sizes() == scale.sizes()),
              "codes/scale shapes do not match out ", out.sizes());
  const View<uint8_t> C(codes);
  const View<at::Half> S(scale);
  const View<at::Half> M = asym ? View<at::Half>(*mins) : View<at::Half>();
  const View<float> O(out);
  at::parallel_for(0, B * H, 1, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const int64_t b = r / H, h = r % H;
      for (int64_t t = 0; t < T; ++t) {
        const uint8_t* c = C.row(b, h, t);
        const at::Half* s = S.row(b, h, t);
        float* o = O.row(b, h, t);
        for (int64_t k = 0; k < nb; ++k) {
          const float d = static_cast<float>(s[k]);
          float* __restrict__ ok = o + k * BLOCK;
          if (nbits == 8) {
            const int8_t* __restrict__ ck = reinterpret_cast<const int8_t*>(c + k * BLOCK);
            for (int j = 0; j < BLOCK; ++j) ok[j] = d * static_cast<float>(ck[j]);
          } else {  // codes first (bytes, in place), then one float pass
            const uint8_t* __restrict__ ck = c + k * BLOCK / 2;
            int8_t q[BLOCK];
            const int off = asym ? 0 : 8;
            for (int j = 0; j < BLOCK / 2; ++j) {
              q[j] = static_cast<int8_t>((ck[j] & 15) - off);
              q[j + BLOCK / 2] = static_cast<int8_t>((ck[j] >> 4) - off);
            }
            if (asym) {
              const float mk = static_cast<float>(M.row(b, h, t)[k]);
              for (int j = 0; j < BLOCK; ++j) ok[j] = static_cast<float>(q[j]) * d + mk;
            } else {
              for (int j = 0; j < BLOCK; ++j) ok[j] = static_cast<float>(q[j]) * d;
            }
          }
        }
      }
    }
  });
}

// ------------------------------------------------------------------------------------------------------
// KIVI (kvlab/quant/kivi.py, uniform.affine_params / to_codes): per group, lo = fp16(min), scale =
// fp16(max(max - lo, 0) / (2**bits - 1)) (0 -> 1), code = clamp(round_half_even((x - lo) / scale)).
// K: groups of `group` tokens per channel; codes (B, H, D, T*bits/8) packed along tokens, scale and min
// (B, H, T/group, D). V: groups of `group` channels per token; codes (B, H, T, D*bits/8), scale and min
// (B, H, T, D/group). Code i of a byte sits in bits [i*bits, (i+1)*bits).
// ------------------------------------------------------------------------------------------------------
namespace {

inline void affine(const float* v, int64_t n, int64_t stride, float qmax, at::Half* s_out, at::Half* m_out,
                   float* s, float* lo16) {
  float lo = v[0], hi = v[0];
  for (int64_t j = 1; j < n; ++j) {
    const float x = v[j * stride];
    lo = x < lo ? x : lo;
    hi = x > hi ? x : hi;
  }
  const at::Half lo_h(lo);
  *lo16 = static_cast<float>(lo_h);
  float diff = hi - *lo16;
  diff = diff < 0.0f ? 0.0f : diff;
  at::Half s_h(diff / qmax);
  if (static_cast<float>(s_h) == 0.0f) s_h = at::Half(1.0f);
  *s = static_cast<float>(s_h);
  *s_out = s_h;
  *m_out = lo_h;
}

inline int code_of(float x, float lo, float s, float qmax) {
  float q = std::nearbyint((x - lo) / s);  // default rounding mode: to nearest even (torch.round)
  q = q < 0.0f ? 0.0f : (q > qmax ? qmax : q);
  return static_cast<int>(q);
}

}  // namespace

std::vector<at::Tensor> kivi_quantize(const at::Tensor& x, int64_t bits, int64_t group, bool is_k) {
  check_input(x);
  KV_CHECK(bits == 2 || bits == 4, "bits must be 2 or 4, got ", bits);
  const InputRows X(x);
  const int64_t B = X.B, H = X.H, T = X.T, D = X.D, per = 8 / bits;
  const float qmax = static_cast<float>((1 << bits) - 1);
  KV_CHECK(group >= 1, "group must be positive");
  if (is_k) {
    KV_CHECK(T % group == 0 && T % per == 0, "K: T=", T, " is not a multiple of group=", group);
  } else {
    KV_CHECK(D % group == 0 && D % per == 0, "V: D=", D, " is not a multiple of group=", group);
  }
  if (!X.all_finite()) return {};
  auto u8 = at::TensorOptions().dtype(at::kByte);
  auto f16 = at::TensorOptions().dtype(at::kHalf);
  at::Tensor codes, scale, mins;
  if (is_k) {
    codes = at::zeros({B, H, D, T / per}, u8);
    scale = at::empty({B, H, T / group, D}, f16);
    mins = at::empty({B, H, T / group, D}, f16);
  } else {
    codes = at::zeros({B, H, T, D / per}, u8);
    scale = at::empty({B, H, T, D / group}, f16);
    mins = at::empty({B, H, T, D / group}, f16);
  }
  const View<uint8_t> C(codes);
  const View<at::Half> S(scale), M(mins);
  at::parallel_for(0, B * H, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> xs(group * D);
    for (int64_t r = begin; r < end; ++r) {
      const int64_t b = r / H, h = r % H;
      if (is_k) {
        for (int64_t g = 0; g < T / group; ++g) {
          for (int64_t i = 0; i < group; ++i) X.load(b, h, g * group + i, xs.data() + i * D);
          at::Half* so = S.row(b, h, g);
          at::Half* mo = M.row(b, h, g);
          for (int64_t d = 0; d < D; ++d) {
            float s, lo;
            affine(xs.data() + d, group, D, qmax, so + d, mo + d, &s, &lo);
            uint8_t* c = C.row(b, h, d);
            for (int64_t i = 0; i < group; ++i) {
              const int64_t t = g * group + i;
              c[t / per] |= static_cast<uint8_t>(code_of(xs[i * D + d], lo, s, qmax) << (bits * (t % per)));
            }
          }
        }
      } else {
        for (int64_t t = 0; t < T; ++t) {
          X.load(b, h, t, xs.data());
          at::Half* so = S.row(b, h, t);
          at::Half* mo = M.row(b, h, t);
          uint8_t* c = C.row(b, h, t);
          for (int64_t g = 0; g < D / group; ++g) {
            float s, lo;
            affine(xs.data() + g * group, group, 1, qmax, so + g, mo + g, &s, &lo);
            for (int64_t i = 0; i < group; ++i) {
              const int64_t d = g * group + i;
              c[d / per] |= static_cast<uint8_t>(code_of(xs[d], lo, s, qmax) << (bits * (d % per)));
            }
          }
        }
      }
    }
  });
  return {codes, scale, mins};
}

namespace {

// The PER codes of each byte as PER bytes: expand[byte] read as PER bytes (little-endian: code i at byte i).
template <int BITS>
const uint32_t* byte_expand() {
  constexpr int PER = 8 / BITS, MASK = (1 << BITS) - 1;
  static const std::vector<uint32_t> table = [] {
    std::vector<uint32_t> v(256);
    for (int byte = 0; byte < 256; ++byte)
      for (int i = 0; i < PER; ++i) v[byte] |= static_cast<uint32_t>((byte >> (BITS * i)) & MASK) << (8 * i);
    return v;
  }();
  return table.data();
}

// GROUP > 0: the group size as a compile-time constant (the common 32: loops the compiler vectorizes);
// GROUP = 0: the runtime ``group_arg``.
template <int BITS, int GROUP>
void kivi_read_rows(const View<uint8_t>& C, const View<at::Half>& S, const View<at::Half>& M, const View<float>& O,
                    int64_t b, int64_t h, int64_t T, int64_t D, int64_t group_arg, bool is_k) {
  constexpr int PER = 8 / BITS, MASK = (1 << BITS) - 1;
  const int64_t group = GROUP ? GROUP : group_arg;
  std::vector<float> sf(D), mf(D);
  if (is_k) {  // per group of tokens: the group's code bytes transposed to (byte column, channel), then
               // for each token one vectorizable pass over the channels (shift, mask, scale, add)
    std::vector<uint8_t> cols(group / PER * D);
    for (int64_t g = 0; g < T / group; ++g) {
      for (int64_t d = 0; d < D; ++d) {
        const uint8_t* __restrict__ c = C.row(b, h, d) + g * group / PER;
        for (int64_t j = 0; j < group / PER; ++j) cols[j * D + d] = c[j];
      }
      const at::Half* s = S.row(b, h, g);
      const at::Half* m = M.row(b, h, g);
      for (int64_t d = 0; d < D; ++d) {
        sf[d] = static_cast<float>(s[d]);
        mf[d] = static_cast<float>(m[d]);
      }
      const float* __restrict__ sp = sf.data();
      const float* __restrict__ mp = mf.data();
      for (int64_t j = 0; j < group / PER; ++j) {
        const uint8_t* __restrict__ cj = cols.data() + j * D;
        for (int i = 0; i < PER; ++i) {
          float* __restrict__ o = O.row(b, h, g * group + j * PER + i);
          for (int64_t d = 0; d < D; ++d) o[d] = static_cast<float>((cj[d] >> (BITS * i)) & MASK) * sp[d] + mp[d];
        }
      }
    }
  } else {  // per token: codes to bytes, then one float pass per group of channels
    const uint32_t* expand = byte_expand<BITS>();
    std::vector<uint8_t> row_codes(D);
    uint8_t* __restrict__ q = row_codes.data();
    for (int64_t t = 0; t < T; ++t) {
      const uint8_t* __restrict__ c = C.row(b, h, t);
      const at::Half* s = S.row(b, h, t);
      const at::Half* m = M.row(b, h, t);
      float* __restrict__ o = O.row(b, h, t);
      for (int64_t j = 0; j < D / PER; ++j) std::memcpy(q + j * PER, expand + c[j], PER);  // little-endian
      for (int64_t g = 0; g < D / group; ++g) {
        const float sg = static_cast<float>(s[g]), mg = static_cast<float>(m[g]);
        float* __restrict__ og = o + g * group;
        const uint8_t* __restrict__ qg = q + g * group;
        for (int64_t i = 0; i < group; ++i) og[i] = static_cast<float>(qg[i]) * sg + mg;
      }
    }
  }
}

}  // namespace

void kivi_read(const at::Tensor& codes, const at::Tensor& scale, const at::Tensor& mins, int64_t bits,
               int64_t group, bool is_k, at::Tensor out) {
  check_rows(out, "out", at::kFloat);
  check_rows(codes, "codes", at::kByte);
  check_rows(scale, "scale", at::kHalf);
  check_rows(mins, "min", at::kHalf);
  KV_CHECK(bits == 2 || bits == 4, "bits must be 2 or 4, got ", bits);
  const int64_t B = out.size(0), H = out.size(1), T = out.size(2), D = out.size(3), per = 8 / bits;
  KV_CHECK(group >= 1 && group % per == 0, "group=", group, " must be a positive multiple of ", per);
  bool ok = codes.size(0) == B && codes.size(1) == H && scale.size(0) == B && scale.size(1) == H &&
            mins.sizes() == scale.sizes();
  if (is_k) {
    ok = ok && T % group == 0 && codes.size(2) == D && codes.size(3) == T / per && scale.size(2) == T / group &&
         scale.size(3) == D;
  } else {
    ok = ok && D % group == 0 && codes.size(2) == T && codes.size(3) == D / per && scale.size(2) == T &&
         scale.size(3) == D / group;
  }
  KV_CHECK(ok, (is_k ? "K" : "V"), " codes/scale shapes do not match out ", out.sizes());
  const View<uint8_t> C(codes);
  const View<at::Half> S(scale), M(mins);
  const View<float> O(out);
  at::parallel_for(0, B * H, 1, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const int64_t b = r / H, h = r % H;
      if (bits == 2 && group == 32)
        kivi_read_rows<2, 32>(C, S, M, O, b, h, T, D, group, is_k);
      else if (bits == 2)
        kivi_read_rows<2, 0>(C, S, M, O, b, h, T, D, group, is_k);
      else if (group == 32)
        kivi_read_rows<4, 32>(C, S, M, O, b, h, T, D, group, is_k);
      else
        kivi_read_rows<4, 0>(C, S, M, O, b, h, T, D, group, is_k);
    }
  });
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("ggml_quantize", &ggml_quantize, "ggml q4_0/q4_1/q8_0 blocks of x (B, H, T, D); [] if x is not finite");
  m.def("ggml_read", &ggml_read, "decode a ggml run into float32 out (B, H, T, D)");
  m.def("kivi_quantize", &kivi_quantize, "KIVI K (per channel) or V (per token) of x; [] if x is not finite");
  m.def("kivi_read", &kivi_read, "decode a KIVI run into float32 out (B, H, T, D)");
}
