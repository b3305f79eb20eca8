// torchbragg GPU render kernel: one thread per pixel.
//
// Compiled at run time by torchbragg.gpu_kernel: with NVRTC for the GPU (no nvcc or host compiler
// needed), or as plain C++ for the host (``tb_render_host``), which runs the very same per-pixel
// function over the pixels one after another so that the test suite checks this file's physics on
// machines without a GPU. Variants: -DTB_REAL=float|double -DTB_DOUBLE=0|1 -DTB_SHAPE=0..3
// (square, round, gauss, tophat) -DTB_TABLE=0|1 -DTB_COUNT=0|1 -DTB_INTERP=0|1 -DTB_OVER=0..2
// (-oversample_thick/_polar/_omega: 1 C's running product, 2 per-term weighting). The parameter
// indices (D_*, I_*) are generated from kernel.py's packing (FastPlan) and prepended.
//
// The arithmetic follows the CPU fused kernel in kernel.py evaluation for evaluation: geometry,
// scattering vector and h = a.q in float64, lattice factor and structure factor in TB_REAL,
// sums in float64, in C's loop order (thickness, slow subpixel, fast subpixel, source, phi, mosaic).

#ifdef __CUDACC_RTC__
#define TB_HD __device__ __forceinline__
typedef long long i64;
typedef unsigned int u32;
typedef unsigned char u8;
#define TB_SIGNBIT(x) signbit(x)
#else
#include <math.h>
#include <stdint.h>
#define TB_HD static inline
typedef int64_t i64;
typedef uint32_t u32;
typedef uint8_t u8;
#define TB_SIGNBIT(x) std::signbit(x)
#include <cmath>
#endif

typedef TB_REAL real;
#if TB_INTERP
typedef double tb_table_t;  // interpolation reads 64 entries a lookup: the table comes widened already
#else
typedef real tb_table_t;
#endif

// @include kernel_math.h

// What one pixel's evaluations give: the image value (before the mask), the solid angle of its
// first subpixel, and the fallback counts (evaluations that used default_F, and those of them
// outside the table's box).
struct TbPixel {
    double value;
    double omega;
    u32 n_default;
    u32 n_outside;
};

TB_HD TbPixel tb_pixel(const double* __restrict__ dp, const i64* __restrict__ ip,
                       const double* __restrict__ lattice, const double* __restrict__ src,
                       const tb_table_t* __restrict__ table, i64 row, i64 col) {
    const i64 os = ip[I_oversample], T = ip[I_T], S = ip[I_S], PM = ip[I_P] * ip[I_M];
    const bool point_pixel = ip[I_point_pixel] != 0, nopolar = ip[I_nopolar] != 0;
    const bool thick_on = ip[I_thick_on] != 0, dmin_on = ip[I_dmin_on] != 0, water = ip[I_water] != 0;
    const double sub = dp[D_subpixel], pix = dp[D_pixel], close = dp[D_close];
    const double fx = dp[D_fdet + 0], fy = dp[D_fdet + 1], fz = dp[D_fdet + 2];
    const double sx = dp[D_sdet + 0], sy = dp[D_sdet + 1], sz = dp[D_sdet + 2];
    const double ox = dp[D_odet + 0], oy = dp[D_odet + 1], oz = dp[D_odet + 2];
    const double p0x = dp[D_pix0 + 0], p0y = dp[D_pix0 + 1], p0z = dp[D_pix0 + 2];
    const double thickstep = dp[D_thickstep], mu = dp[D_mu], dmin = dp[D_dmin], kahn = dp[D_kahn];
    const real na = (real)dp[D_N + 0], nb = (real)dp[D_N + 1], nc = (real)dp[D_N + 2];
    const bool na_even = ((i64)dp[D_N + 0] - 1) % 2 != 0;
    const bool nb_even = ((i64)dp[D_N + 1] - 1) % 2 != 0;
    const bool nc_even = ((i64)dp[D_N + 2] - 1) % 2 != 0;
    const real fudge = (real)dp[D_fudge];
    (void)na_even; (void)nb_even; (void)nc_even; (void)fudge; (void)water; (void)table;
#if TB_TABLE
    const double dhmin = (double)ip[I_bounds + 0], dhmax = (double)ip[I_bounds + 1];
    const double dkmin = (double)ip[I_bounds + 2], dkmax = (double)ip[I_bounds + 3];
    const double dlmin = (double)ip[I_bounds + 4], dlmax = (double)ip[I_bounds + 5];
    const double dnh = dhmax - dhmin + 1.0, dnk = dkmax - dkmin + 1.0, dnl = dlmax - dlmin + 1.0;
    const double dsize = dnh * dnk * dnl;
    const double lo[3] = {dhmin, dkmin, dlmin};
    (void)lo;
#else
    const real default_F = (real)dp[D_default_F];
#endif

    double acc = 0.0, om_first = 0.0, cap_last = 1.0, pol_first = 0.0;
    bool found = false;
#if TB_OVER
    // the -oversample_* factors per evaluation: fsub per subpixel (capture, omega), fpol per (subpixel,
    // source) (times polarisation); fsum their sum (TB_OVER 2), om_sum the subpixels' solid angles
    const bool ov_thick = ip[I_ov_thick] != 0, ov_polar = ip[I_ov_polar] != 0, ov_omega = ip[I_ov_omega] != 0;
    double fsum = 0.0, om_sum = 0.0;
    if (TB_OVER == 1)
        acc = dp[D_I_bg];  // C's running product starts from the background
#else
    const bool ov_thick = false, ov_polar = false;
#endif
    u32 n_default = 0, n_outside = 0;
    for (i64 t = 0; t < T; ++t) {
        const double toff = (double)t * thickstep;
        for (i64 ss = 0; ss < os; ++ss) {
            const double Sdet = ((double)(row * os) + ((double)ss + 0.5)) * sub;
            for (i64 sf = 0; sf < os; ++sf) {
                const double Fdet = ((double)(col * os) + ((double)sf + 0.5)) * sub;
                double px = Fdet * fx + Sdet * sx + toff * ox + p0x;
                double py = Fdet * fy + Sdet * sy + toff * oy + p0y;
                double pz = Fdet * fz + Sdet * sz + toff * oz + p0z;
                if (ip[I_curved] != 0) {  // -curved_det
                    double v[3] = {px, py, pz};
                    tb_curve(v, dp);
                    px = v[0]; py = v[1]; pz = v[2];
                }
                const double air = sqrt(px * px + py * py + pz * pz);
                const double inv = 1.0 / air;
                const double dx = px * inv, dy = py * inv, dz = pz * inv;
                const double om = point_pixel ? 1.0 / (air * air) : pix * pix / (air * air) * close / air;
                if (t == 0 && ss == 0 && sf == 0)  // C applies the first subpixel's solid angle
                    om_first = om;
                const bool last_cap = t == T - 1 && ss == 0 && sf == 0;  // and the last layer's capture
                double cap = 1.0;
                if (thick_on && (last_cap || ov_thick)) {
                    const double parallax = dx * ox + dy * oy + dz * oz;
                    // from behind the sensor (parallax <= 0): not captured
                    cap = parallax > 0.0 ? exp(-(double)t * thickstep * mu / parallax)
                          - exp(-((double)t + 1.0) * thickstep * mu / parallax) : 0.0;
                    if (last_cap)
                        cap_last = cap;
                }
#if TB_OVER
                om_sum += om;
                const double fsub = (ov_omega ? om : 1.0) * (ov_thick ? cap : 1.0);
#endif
                for (i64 s = 0; s < S; ++s) {
                    const double* sp = src + 10 * s;
                    const double ix = sp[0], iy = sp[1], iz = sp[2], il = sp[3];
                    const double X = (dx - ix) * il, Y = (dy - iy) * il, Z = (dz - iz) * il;
                    bool dskip = false;
                    if (dmin_on) {
                        const double stol = 0.5 * sqrt(X * X + Y * Y + Z * Z);
                        dskip = (stol > 0.0) && (dmin > 0.5 / (stol > 0.0 ? stol : 1.0));
                    }
                    double polar = 1.0;
                    if ((!found && !dskip) || ov_polar) {
                        // C applies the polarisation of the first (subpixel, source) that -dmin does not skip
                        polar = tb_polar(dx, dy, dz, sp, kahn, nopolar);
                        if (!found && !dskip) {
                            pol_first = polar;
                            found = true;
                        }
                    }
#if TB_OVER
                    const double fpol = ov_polar ? fsub * polar : fsub;
#endif
                    for (i64 pm = 0; pm < PM; ++pm) {
                        const double* L = lattice + 9 * pm;
                        const double h = X * L[0] + Y * L[1] + Z * L[2];
                        const double k = X * L[3] + Y * L[4] + Z * L[5];
                        const double l = X * L[6] + Y * L[7] + Z * L[8];
                        const double h0 = ceil(h - 0.5), k0 = ceil(k - 0.5), l0 = ceil(l - 0.5);
                        const real fh = (real)(h - h0), fk = (real)(k - k0), fl = (real)(l - l0);
                        real Fl;
#if TB_SHAPE == 0
                        Fl = tb_sincg(fh, h0, na, na_even) * tb_sincg(fk, k0, nb, nb_even)
                             * tb_sincg(fl, l0, nc, nc_even);
#elif TB_SHAPE == 1
                        Fl = tb_round_factor(fh * fh * na * na + fk * fk * nb * nb + fl * fl * nc * nc, fudge,
                                             na * nb * nc);
#else
                        {
                            const double dh = h - h0, dk = k - k0, dl = l - l0;
                            const double* A = dp + D_a_star;
                            const double u = dh * A[0] + dk * A[3] + dl * A[6];
                            const double v = dh * A[1] + dk * A[4] + dl * A[7];
                            const double w = dh * A[2] + dk * A[5] + dl * A[8];
                            const real rad = (real)((u * u + v * v + w * w) * dp[D_N2prod]);
#if TB_SHAPE == 2
                            Fl = (real)dp[D_Nprod] * exp(-(rad / (real)0.63 * fudge));
#else
                            Fl = (real)dp[D_Nprod] * (real)(rad * fudge < (real)0.3969);
#endif
                        }
#endif
                        // a zero lattice factor skips the lookup (C); a square crystal never does (see kernel.py)
                        const bool skipped = dskip || (!water && TB_SHAPE != 0 && Fl == (real)0);
                        real Fc;
#if TB_TABLE
                        // outside the box the index is the extra last entry, which holds default_F
                        const bool inside = h0 >= dhmin && h0 <= dhmax && k0 >= dkmin && k0 <= dkmax
                                            && l0 >= dlmin && l0 <= dlmax;
                        const double didx = ((h0 - dhmin) * dnk + (k0 - dkmin)) * dnl + (l0 - dlmin);
                        Fc = (real)table[(i64)(inside ? didx : dsize)];
#if TB_COUNT && !TB_INTERP
                        // the counting table's sign bit marks default_F entries
                        n_default += (!skipped && TB_SIGNBIT(Fc)) ? 1u : 0u;
                        n_outside += (!skipped && !inside) ? 1u : 0u;
#endif
#if TB_INTERP
                        if (!skipped) {
                            // tricubic Lagrange interpolation (kernel_math.h), where C interpolates
                            const double val = tb_tricubic(table, h, k, l, lo, dnh, dnk, dnl);
                            Fc = (real)val;
                        }
#endif
#else
                        Fc = default_F;
#if TB_COUNT
                        n_default += skipped ? 0u : 1u;
#endif
#endif
                        const real I = skipped ? (real)0 : Fc * Fc * Fl * Fl;
#if TB_OVER == 1
                        acc = skipped ? acc : (acc + (double)I) * fpol;
#elif TB_OVER == 2
                        acc += (double)I * fpol;
                        fsum += fpol;
#else
                        acc += (double)I;
#endif
                    }
                }
            }
        }
    }
    TbPixel out;
    const double nsub = (double)(T * os * os);
#if TB_OVER
    const double sum = TB_OVER == 1 ? acc : acc + dp[D_I_bg] * fsum / (nsub * (double)(S * PM));
    out.value = sum * dp[D_scale] * (ov_thick ? 1.0 : cap_last) * (ov_polar ? 1.0 : pol_first)
                * (ov_omega ? 1.0 : om_first);
    out.omega = ov_omega ? om_sum : nsub * om_first;
#else
    out.value = (acc + dp[D_I_bg]) * dp[D_scale] * cap_last * pol_first * om_first;
    out.omega = nsub * om_first;
#endif
    out.n_default = n_default;
    out.n_outside = n_outside;
    return out;
}

// Store one pixel: the image value (0 where masked), its solid-angle sum, and with TB_COUNT its
// fallback count (int8/16/32 by ip[I_count_bytes]) and dominant reason: 1 without a table; with
// one, 3 (unlisted) only when it outnumbers 2 (outside the box); 0 for none.
TB_HD void tb_store(const double* dp, const i64* ip, const double* lattice, const double* src,
                    const tb_table_t* table, const u8* mask, i64 row0, i64 col0, i64 ncols, i64 r, i64 c,
                    real* image, i64 image_stride, void* counts, u8* reasons, i64 fb_stride, double* omega) {
    const i64 row = row0 + r, col = col0 + c;
    const bool active = mask == 0 || mask[row * ip[I_fpixels] + col] != 0;
    TbPixel px;
    px.value = 0.0; px.omega = 0.0; px.n_default = 0; px.n_outside = 0;
    if (active)
        px = tb_pixel(dp, ip, lattice, src, table, row, col);
    image[r * image_stride + c] = (real)px.value;
    omega[r * ncols + c] = px.omega;
#if TB_COUNT
    const u32 tot = TB_INTERP ? 0u : px.n_default;
    const u8 dom = TB_TABLE ? (tot - px.n_outside > px.n_outside ? 3 : 2) : 1;
    const i64 at = r * fb_stride + c;
    const i64 cb = ip[I_count_bytes];
    if (cb == 1)
        ((signed char*)counts)[at] = (signed char)tot;
    else if (cb == 2)
        ((short*)counts)[at] = (short)tot;
    else
        ((int*)counts)[at] = (int)tot;
    reasons[at] = tot > 0 ? dom : (u8)0;
#else
    (void)counts; (void)reasons; (void)fb_stride;
#endif
}

#ifdef __CUDACC_RTC__
// One thread per pixel of the block rows row0.. x columns col0.. (pixel index = r * ncols + c).
extern "C" __global__ void tb_render(const double* dp, const i64* ip, const double* lattice, const double* src,
                                     const tb_table_t* table, const u8* mask, i64 row0, i64 nrows, i64 col0, i64 ncols,
                                     real* image, i64 image_stride, void* counts, u8* reasons, i64 fb_stride,
                                     double* omega) {
    const i64 p = (i64)blockIdx.x * (i64)blockDim.x + (i64)threadIdx.x;
    if (p >= nrows * ncols)
        return;
    const i64 r = p / ncols, c = p - (p / ncols) * ncols;
    tb_store(dp, ip, lattice, src, table, mask, row0, col0, ncols, r, c, image, image_stride, counts, reasons,
             fb_stride, omega);
}
#else
// The same pixels, one after another on the host: what the GPU threads compute, for testing.
extern "C" int tb_render_host(const double* dp, const i64* ip, const double* lattice, const double* src,
                              const tb_table_t* table, const u8* mask, i64 row0, i64 nrows, i64 col0, i64 ncols,
                              real* image, i64 image_stride, void* counts, u8* reasons, i64 fb_stride,
                              double* omega) {
    for (i64 p = 0; p < nrows * ncols; ++p) {
        const i64 r = p / ncols, c = p - (p / ncols) * ncols;
        tb_store(dp, ip, lattice, src, table, mask, row0, col0, ncols, r, c, image, image_stride, counts,
                 reasons, fb_stride, omega);
    }
    return 0;
}
#endif
