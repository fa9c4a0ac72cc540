/* Big-endian loads/stores and the debug switch for the Cython core.
 * memcpy keeps unaligned access legal; gcc folds it into a single move. */
#ifndef SWITCHBOARD_WIRE_H
#define SWITCHBOARD_WIRE_H
#include <stdint.h>
#include <string.h>

#ifndef SWITCHBOARD_DEBUG
#define SWITCHBOARD_DEBUG 0
#endif

static inline uint16_t sb_load16(const unsigned char *p) { uint16_t v; memcpy(&v, p, 2); return __builtin_bswap16(v); }
static inline uint32_t sb_load32(const unsigned char *p) { uint32_t v; memcpy(&v, p, 4); return __builtin_bswap32(v); }
static inline uint64_t sb_load64(const unsigned char *p) { uint64_t v; memcpy(&v, p, 8); return __builtin_bswap64(v); }
static inline void sb_store16(unsigned char *p, uint16_t v) { v = __builtin_bswap16(v); memcpy(p, &v, 2); }
static inline void sb_store32(unsigned char *p, uint32_t v) { v = __builtin_bswap32(v); memcpy(p, &v, 4); }
static inline void sb_store64(unsigned char *p, uint64_t v) { v = __builtin_bswap64(v); memcpy(p, &v, 8); }
#endif
