// Packed 4- to 6-bit types unpacked to int8 values with per-16-column scales and offsets.
//
// A block of these types holds w[c] = d[c / 16] * q[c] + m[c / 16] with small integers q and one
// scale (and offset) per 16 or 32 columns. The unpackers write q as int8 and d, m as float per
// 16-column group, a whole column range per call: plain fixed-length loops that compilers
// vectorise for every ISA. q is unsigned and below 64 for every type but IQ4_NL (a signed code book).
#pragma once

#include "internal.h"

// Unpack nblocks consecutive blocks: q gets block_size values per block, d and m one per 16.
typedef void (*unpack_range_fn)(const uint8_t * blocks, int64_t nblocks, int8_t * q, float * d, float * m);

// The unpacker of a type, or NULL where the type has none.
ACTSPARSE_INTERNAL unpack_range_fn actsparse_unpacker(enum ggml_type type);
