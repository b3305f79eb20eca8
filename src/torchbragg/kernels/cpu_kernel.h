// What both CPU kernels (cpu_render.cpp, cpu_adjoint.cpp) define before including kernel_math.h: the
// render dtype ``real`` (-DTB_REAL), the integer types, the block width CB, the qualifiers and helpers
// kernel_math.h asks for, and TB_EXP, the vectorising exponential of the gauss lattice factor. Each
// kernel then typedefs ``tb_table_t`` (the table's entries) itself.
#include <math.h>
#include <cmath>
#include <cstdint>
#include <cstring>

typedef TB_REAL real;
typedef int64_t i64_t;
typedef uint32_t u32_t;
#define CB 256

#define TB_HD static inline
#define TB_SIGNBIT(x) std::signbit(x)
#define TB_INDEX int
#define TB_EXP tb_exp

// 2^m for an integer-valued m in the exponent range (m >= -1022 double, -126 float), from the exponent
// bits: m + bias added to 1.5 * 2^52 (2^23) lands in the low mantissa bits, a shift moves it into the
// exponent field (integer adds and shifts only, so it vectorises without AVX-512)
static inline double tb_pow2(double m) {
    const double t = m + (1023.0 + 6755399441055744.0);
    uint64_t bits;
    std::memcpy(&bits, &t, sizeof bits);
    bits <<= 52;
    double v;
    std::memcpy(&v, &bits, sizeof v);
    return v;
}
static inline float tb_pow2(float m) {
    const float t = m + (127.0f + 12582912.0f);
    uint32_t bits;
    std::memcpy(&bits, &t, sizeof bits);
    bits <<= 23;
    float v;
    std::memcpy(&v, &bits, sizeof v);
    return v;
}

// e^x in the render dtype, written to vectorise (the C library's exp does not): x = k ln2 + r with
// |r| <= ln2/2 (ln2 in two parts), e^r by its Taylor series, times 2^k in two steps so that subnormal
// results are kept; 0 below half the smallest subnormal, infinity above the largest value
static inline real tb_exp(real x) {
#if TB_DOUBLE
    const real lo_limit = (real)-745.1332191019412, hi_limit = (real)709.782712893384;
    const real ln2_hi = (real)0.6931471803691238, ln2_lo = (real)1.9082149292705877e-10;
#else
    const real lo_limit = (real)-103.97208f, hi_limit = (real)88.72283f;
    const real ln2_hi = (real)0.693145751953125f, ln2_lo = (real)1.428606765330187e-06f;
#endif
    const real k = rint(x * (real)1.4426950408889634);
    const real r = (x - k * ln2_hi) - k * ln2_lo;
    real p;
#if TB_DOUBLE
    p = (real)(1.0 / 6227020800.0);
    p = p * r + (real)(1.0 / 479001600.0);
    p = p * r + (real)(1.0 / 39916800.0);
    p = p * r + (real)(1.0 / 3628800.0);
    p = p * r + (real)(1.0 / 362880.0);
    p = p * r + (real)(1.0 / 40320.0);
#else
    p = (real)(1.0 / 40320.0);
#endif
    p = p * r + (real)(1.0 / 5040.0);
    p = p * r + (real)(1.0 / 720.0);
    p = p * r + (real)(1.0 / 120.0);
    p = p * r + (real)(1.0 / 24.0);
    p = p * r + (real)(1.0 / 6.0);
    p = p * r + (real)0.5;
    p = p * r + (real)1;
    p = p * r + (real)1;
    const real k1 = floor(k * (real)0.5), k2 = k - k1;
    const real v = p * tb_pow2(k1) * tb_pow2(k2);
    return x < lo_limit ? (real)0 : (x > hi_limit ? (real)INFINITY : v);
}
