/* What the kernels that use Intel AMX tiles (Sapphire Rapids and later) share: their instruction set, set per
 * function (callers check microscale_amx_supported first), and the one tile shape they use. */

#ifndef MICROSCALE_CPU_AMX_H
#define MICROSCALE_CPU_AMX_H

#include <sys/syscall.h>
#include <unistd.h>

#include "simd.h"

#define AMX __attribute__((target("avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512bf16,amx-tile,amx-bf16")))

#define TILE 16   /* rows of a tile; also the float32 columns of a result tile */
#define TILE_K 32 /* bfloat16 values of k per tile row (64 bytes) */

#define ARCH_REQ_XCOMP_PERM 0x1023 /* Linux: a process asks once to use the AMX tile registers */
#define XFEATURE_XTILEDATA 18

/* The CPU has AMX-BF16 and AVX512-BF16 and Linux lets this process use the tile registers. */
int microscale_amx_supported(void) {
    __builtin_cpu_init();
    if (!(__builtin_cpu_supports("amx-bf16") && __builtin_cpu_supports("amx-tile") &&
          __builtin_cpu_supports("avx512bf16") && __builtin_cpu_supports("avx512bw")))
        return 0;
    return syscall(SYS_arch_prctl, ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA) == 0;
}

typedef struct {
    uint8_t palette, start_row, reserved[14];
    uint16_t colsb[16];
    uint8_t rows[16];
} tile_config;

/* Eight tiles of 16 rows by 64 bytes. A constant in memory: GCC does not see that ldtilecfg reads its operand
 * and drops stores to a local one (a zeroed config, whose reserved bytes then fault). */
static const tile_config TILES_16X64 __attribute__((aligned(64))) = {
    .palette = 1,
    .colsb = {64, 64, 64, 64, 64, 64, 64, 64},
    .rows = {TILE, TILE, TILE, TILE, TILE, TILE, TILE, TILE},
};

/* For the calling thread (each thread configures its own tiles). */
AMX static inline void configure_tiles(void) { _tile_loadconfig(&TILES_16X64); }

AMX static inline void release_tiles(void) { _tile_release(); }

#endif
