// torch binding of the CUDA KIVI decode attention (kernels and launchers in kivi_attention_cuda.cu, declared in
// kivi_attention_cuda.h). Built on first use by kvlab/kernels/kivi_cuda.py through torch.utils.cpp_extension;
// the Python side validates every argument (shapes, dtypes, alignment), picks the variant and plans the
// splits; this file only fills the parameters and launches.

#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/extension.h>

#include "kivi_attention_cuda.h"

namespace {

int window_dtype(const at::Tensor& t) {
  if (t.scalar_type() == at::kHalf) return 0;
  if (t.scalar_type() == at::kBFloat16) return 1;
  TORCH_CHECK(t.scalar_type() == at::kFloat, "window dtype must be float16, bfloat16 or float32");
  return 2;
}

}  // namespace

// CTAs of the decode kernel (bits, D, nt, variant, group, tune) that one SM of CUDA device `device` holds at
// once; -1: no such kernel.
int64_t occupancy(int64_t bits, int64_t D, int64_t nt, int64_t variant, int64_t group, int64_t device,
                  int64_t tune) {
  const c10::cuda::CUDAGuard guard(static_cast<c10::DeviceIndex>(device));
  return kvlab::kivi_occupancy(static_cast<int>(bits), static_cast<int>(D), static_cast<int>(nt),
                               static_cast<int>(variant), static_cast<int>(group), static_cast<int>(tune));
}

// out (B, Hq, NQ, D) fp16 <- attention; o_part (B*Hq*NQ, n_main, D) fp32 and lse_part (B*Hq*NQ, n_main)
// are scratch.
void decode(const at::Tensor& q, const at::Tensor& k_codes, const at::Tensor& k_scale, const at::Tensor& k_min,
            const at::Tensor& k_fp16, const at::Tensor& v_codes, const at::Tensor& v_scale,
            const at::Tensor& v_min, const at::Tensor& v_fp16, const at::Tensor& lengths, at::Tensor& o_part,
            at::Tensor& lse_part, at::Tensor& out, int64_t bits, int64_t group, int64_t residual, int64_t n_main,
            int64_t split_len, double qk_scale, int64_t variant, int64_t tune) {
  TORCH_CHECK(q.is_cuda() && q.scalar_type() == at::kHalf && q.dim() == 4, "q must be a CUDA fp16 (B, Hq, n, D)");
  TORCH_CHECK(out.is_contiguous() && out.scalar_type() == at::kHalf, "out must be contiguous fp16");
  const c10::cuda::CUDAGuard guard(q.device());
  kvlab::KiviParams p{};
  p.q = reinterpret_cast<const __half*>(q.data_ptr());
  p.sq_b = q.stride(0), p.sq_h = q.stride(1), p.sq_t = q.stride(2);
  p.kc = k_codes.data_ptr<uint8_t>();
  p.skc_b = k_codes.stride(0), p.skc_h = k_codes.stride(1), p.skc_d = k_codes.stride(2);
  p.ks = reinterpret_cast<const __half*>(k_scale.data_ptr());
  p.km = reinterpret_cast<const __half*>(k_min.data_ptr());
  p.sks_b = k_scale.stride(0), p.sks_h = k_scale.stride(1), p.sks_g = k_scale.stride(2);
  p.kw = k_fp16.data_ptr();
  p.skw_b = k_fp16.stride(0), p.skw_h = k_fp16.stride(1), p.skw_t = k_fp16.stride(2);
  p.kw_dtype = window_dtype(k_fp16);
  p.vc = v_codes.data_ptr<uint8_t>();
  p.svc_b = v_codes.stride(0), p.svc_h = v_codes.stride(1), p.svc_t = v_codes.stride(2);
  p.vs = reinterpret_cast<const __half*>(v_scale.data_ptr());
  p.vm = reinterpret_cast<const __half*>(v_min.data_ptr());
  p.svs_b = v_scale.stride(0), p.svs_h = v_scale.stride(1), p.svs_t = v_scale.stride(2);
  p.vw = v_fp16.data_ptr();
  p.svw_b = v_fp16.stride(0), p.svw_h = v_fp16.stride(1), p.svw_t = v_fp16.stride(2);
  p.vw_dtype = window_dtype(v_fp16);
  p.lengths = lengths.data_ptr<int32_t>();
  p.o_part = o_part.data_ptr<float>();
  p.lse_part = lse_part.data_ptr<float>();
  p.qk_scale = static_cast<float>(qk_scale);
  const int64_t H = k_codes.size(1), Hq = q.size(1), NQ = q.size(2), D = q.size(3);
  TORCH_CHECK(H > 0 && Hq % H == 0 && NQ > 0 && (D == 64 || D == 128),
              "kv heads H > 0 dividing Hq, n >= 1 query tokens and D in 64, 128 expected; got H=", H, " Hq=", Hq,
              " n=", NQ, " D=", D);
  p.H = static_cast<int>(H);
  p.gqa = static_cast<int>(Hq / H);
  p.nq = static_cast<int>(NQ);
  p.group = static_cast<int>(group);
  p.residual = static_cast<int>(residual);
  p.n_main = static_cast<int>(n_main);
  p.split_len = static_cast<int>(split_len);
  TORCH_CHECK(p.gqa * p.nq <= 16, "gqa * n query rows must be <= 16");
  const int nt = p.gqa * p.nq <= 8 ? 1 : 2;
  const int bh = static_cast<int>(q.size(0) * H);
  const cudaError_t err =
      kvlab::kivi_launch(p, static_cast<int>(bits), static_cast<int>(D), nt, static_cast<int>(variant), bh,
                         static_cast<int>(out.numel() / D), reinterpret_cast<__half*>(out.data_ptr()),
                         c10::cuda::getCurrentCUDAStream(), static_cast<int>(tune));
  TORCH_CHECK(err == cudaSuccess, "CUDA KIVI kernel (bits=", bits, ", D=", D, ", nt=", nt, ", variant=", variant,
              ", group=", group, ", tune=", tune, "): ", cudaGetErrorString(err));
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("decode", &decode, "KIVI fused decode attention (CUDA)");
  m.def("occupancy", &occupancy, "CTAs per SM of the KIVI decode kernel");
}
