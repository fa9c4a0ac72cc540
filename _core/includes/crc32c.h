/* CRC32C (Castagnoli), as used by iSCSI, ext4 and Kafka: the SSE4.2 crc32
 * instruction when the CPU has it (about 8 bytes per cycle), else a table.
 * sb_crc32c_update() works on the raw state so a checksum can be chained over
 * several pieces: state = ~0; state = update(state, ...); crc = ~state. */
#ifndef SWITCHBOARD_CRC32C_H
#define SWITCHBOARD_CRC32C_H
#include <stddef.h>
#include <stdint.h>
#include <string.h>

static uint32_t sb_crc32c_table[256];
static int sb_crc32c_mode = -1;   /* -1 unknown, 0 table, 1 sse4.2 */

static void sb_crc32c_init_table(void) {
    for (uint32_t i = 0; i < 256; i++) {
        uint32_t c = i;
        for (int k = 0; k < 8; k++) c = (c >> 1) ^ (0x82F63B78u & (0u - (c & 1u)));
        sb_crc32c_table[i] = c;
    }
}

static uint32_t sb_crc32c_sw(uint32_t state, const unsigned char *p, size_t n) {
    while (n--) state = sb_crc32c_table[(state ^ *p++) & 0xFF] ^ (state >> 8);
    return state;
}

#if defined(__x86_64__) && defined(__GNUC__)
#include <nmmintrin.h>
__attribute__((target("sse4.2")))
static uint32_t sb_crc32c_hw(uint32_t state, const unsigned char *p, size_t n) {
    uint64_t c = state;
    while (n >= 8) { uint64_t v; memcpy(&v, p, 8); c = _mm_crc32_u64(c, v); p += 8; n -= 8; }
    uint32_t c32 = (uint32_t)c;
    while (n--) c32 = _mm_crc32_u8(c32, *p++);
    return c32;
}
#define SB_HAVE_HW 1
#else
#define SB_HAVE_HW 0
#endif

static void sb_crc32c_setup(int allow_hw) {
    sb_crc32c_init_table();
#if SB_HAVE_HW
    __builtin_cpu_init();
    sb_crc32c_mode = (allow_hw && __builtin_cpu_supports("sse4.2")) ? 1 : 0;
#else
    (void)allow_hw;
    sb_crc32c_mode = 0;
#endif
}

static inline uint32_t sb_crc32c_update(uint32_t state, const void *data, size_t n) {
#if SB_HAVE_HW
    if (sb_crc32c_mode == 1) return sb_crc32c_hw(state, (const unsigned char *)data, n);
#endif
    return sb_crc32c_sw(state, (const unsigned char *)data, n);
}
#endif
