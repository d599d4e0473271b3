// AMX tile products (Intel Sapphire Rapids and later), shared by the kernels that use them: the
// target attribute, the tile configuration and a thread's begin/end of tile use. Whether the CPU
// has AMX and Linux lets this process use it: use_amx() (ops.h; TUILI_ISA=avx512 says no).
#pragma once
#include "common.h"

namespace tuili {

#define TUILI_AMX \
  __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,fma,avx512vnni,avx512bf16,amx-tile,amx-bf16,amx-int8")))

// Eight tiles of 16 rows × 64 bytes (the layout ldtilecfg reads). Kernels name their roles: the
// W4/W8A16 ones use tiles 0-3 as C, 4 and 6 as A, 5 and 7 as B (two of each, so that a load never
// waits for the product still reading the other); W8A8 uses 0-3 as a 2 × 2 block of C.
struct alignas(64) TileConfig {
  uint8_t palette = 1, start_row = 0, reserved[14] = {};
  uint16_t colsb[16] = {64, 64, 64, 64, 64, 64, 64, 64};
  uint8_t rows[16] = {16, 16, 16, 16, 16, 16, 16, 16};
};

TUILI_AMX inline void amx_begin(const TileConfig& config) { _tile_loadconfig(&config); }
TUILI_AMX inline void amx_end() { _tile_release(); }

}  // namespace tuili
