// The folded variant's default instances (kivi_attention_folded.cuh), in their own translation unit so that
// they compile in parallel with the others (kivi_attention_launch.cuh).

#include "kivi_attention_launch.cuh"

namespace kvlab {

int folded_occupancy(int bits, int D, int group) {
  if (bits == 4 && D == 128) return dynamic_occupancy<KIVI_VARIANT_FOLDED, 4, 128>(group);
  if (bits == 4 && D == 64) return dynamic_occupancy<KIVI_VARIANT_FOLDED, 4, 64>(group);
  if (bits == 2 && D == 128) return dynamic_occupancy<KIVI_VARIANT_FOLDED, 2, 128>(group);
  if (bits == 2 && D == 64) return dynamic_occupancy<KIVI_VARIANT_FOLDED, 2, 64>(group);
  return -1;
}

cudaError_t folded_launch(const KiviParams& p, int bits, int D, dim3 grid, cudaStream_t stream) {
  if (bits == 4 && D == 128) return dynamic_launch<KIVI_VARIANT_FOLDED, 4, 128>(p, grid, stream);
  if (bits == 4 && D == 64) return dynamic_launch<KIVI_VARIANT_FOLDED, 4, 64>(p, grid, stream);
  if (bits == 2 && D == 128) return dynamic_launch<KIVI_VARIANT_FOLDED, 2, 128>(p, grid, stream);
  if (bits == 2 && D == 64) return dynamic_launch<KIVI_VARIANT_FOLDED, 2, 64>(p, grid, stream);
  return cudaErrorInvalidValue;
}

}  // namespace kvlab
