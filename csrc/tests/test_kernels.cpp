// C++ test of the compiled CPU kernels, called through the dispatcher exactly as
// torch.ops.astra_C.* does, against naive loops written here. Run by ctest.
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/library.h>

#include "astra_op_schemas.h"  // generated from astra_kernels/ops.py (CMakeLists.txt)

#include <cmath>
#include <cstdio>
#include <limits>
#include <string>
#include <vector>

// The kernel library registers kernels only; in Python, astra_kernels.ops gives them
// their schemas. Here the same schemas come from the generated header. Defining them
// also checks every kernel's C++ signature against its schema.
TORCH_LIBRARY_FRAGMENT(astra_C, m) {
  for (const char* schema : astra::kOpSchemas) m.def(schema);
}

namespace {

int failures = 0;

#define EXPECT(cond, ...)                            \
  do {                                              \
    if (!(cond)) {                                  \
      ++failures;                                   \
      std::printf("FAIL %s:%d: ", __FILE__, __LINE__); \
      std::printf(__VA_ARGS__);                     \
      std::printf("\n");                            \
    }                                               \
  } while (0)

using at::Tensor;
using OptT = c10::optional<Tensor>;

template <typename Sig>
c10::TypedOperatorHandle<Sig> op(const char* name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(name, "").typed<Sig>();
}

void test_pack() {
  auto pack = op<Tensor(const Tensor&, int64_t)>("astra_C::pack_codes");
  auto unpack = op<Tensor(const Tensor&, at::IntArrayRef, int64_t)>("astra_C::unpack_codes");
  // code i at bits [i*b, (i+1)*b), least significant bit first
  Tensor p = pack.call(at::tensor({1, 2, 3}, at::kInt), 2);
  EXPECT(p.numel() == 1 && p.scalar_type() == at::kByte && p[0].item<int>() == 0x39,
        "bit layout of {1,2,3} at 2 bits");
  at::manual_seed(0);
  for (int64_t bits = 1; bits <= 16; ++bits) {
    for (int64_t n : {0, 1, 7, 8, 9, 1001}) {
      Tensor codes = at::randint(0, int64_t(1) << bits, {n}, at::kInt);
      Tensor packed = pack.call(codes, bits);
      EXPECT(packed.numel() == (n * bits + 7) / 8, "byte count bits=%ld n=%ld", bits, n);
      Tensor back = unpack.call(packed, {n}, bits);
      EXPECT(at::equal(back, codes), "round trip bits=%ld n=%ld", bits, n);
    }
  }
}

void test_vq_encode() {
  auto vq = op<std::tuple<Tensor, Tensor>(const Tensor&, const Tensor&, c10::string_view, bool)>(
      "astra_C::vq_encode");
  at::manual_seed(1);
  const int64_t M = 97, G = 3, K = 50, dg = 8;
  Tensor x = at::randn({M, G * dg});
  Tensor cb = at::randn({G, K, dg});
  auto [codes, err] = vq.call(x, cb, "fp32", true);
  auto xa = x.accessor<float, 2>();
  auto ca = cb.accessor<float, 3>();
  auto oa = codes.accessor<int, 2>();
  int wrong = 0;
  for (int64_t m = 0; m < M; ++m) {
    double total = 0;
    for (int64_t g = 0; g < G; ++g) {
      double best = std::numeric_limits<double>::infinity();
      int64_t arg = -1;
      for (int64_t k = 0; k < K; ++k) {
        double d = 0;
        for (int64_t j = 0; j < dg; ++j) {
          double t = double(xa[m][g * dg + j]) - ca[g][k][j];
          d += t * t;
        }
        if (d < best) best = d, arg = k;
      }
      wrong += oa[m][g] != arg;
      total += best;
    }
    EXPECT(std::fabs(err[m].item<float>() - total) <= 1e-4 * (1 + total), "err row %ld", m);
  }
  EXPECT(wrong == 0, "%d codes differ from brute force", wrong);
}

// Naive attention over local + code-built remote keys, in double.
void test_mixed_attention() {
  using Sig = std::tuple<Tensor, Tensor>(const Tensor&, const Tensor&, const Tensor&, const OptT&,
                                         const OptT&, const OptT&, const OptT&, const OptT&, bool,
                                         const OptT&, const OptT&, const OptT&, c10::optional<double>,
                                         const OptT&, const OptT&);
  auto attn = op<Sig>("astra_C::mixed_attention");
  at::manual_seed(2);
  const int64_t B = 2, H = 4, Hkv = 2, Tq = 9, Tl = 6, Tr = 11, d = 40, G = 2, K = 7;
  Tensor q = at::randn({B, H, Tq, d}), k = at::randn({B, Hkv, Tl, d}), v = at::randn({B, Hkv, Tl, d});
  Tensor pk = at::randn({G, K, Hkv, d}), pv = at::randn({G, K, Hkv, d});
  Tensor codes = at::randint(-1, K, {B, Tr, G}, at::kInt);
  Tensor q_pos = at::arange(Tq, at::kLong) * 2 + 3, kv_pos = at::arange(Tl, at::kLong) * 3;
  Tensor remote_pos = at::arange(Tr, at::kLong) * 2;
  const double scale = 0.17;
  // RoPE of remote keys on their first R dims (partial rotary), cos/sin [1, Tr, R]
  const int64_t R = 24;
  Tensor ang = at::rand({1, Tr, R / 2}, at::kFloat) * 6.0;
  Tensor rope_cos = at::cat({ang, ang}, -1).cos(), rope_sin = at::cat({ang, ang}, -1).sin();
  for (int mode = 0; mode < 3; ++mode) {
    const bool causal = mode > 0, rope = mode == 2;
    auto [out, lse] = attn.call(q, k, v, codes, pk, pv, c10::nullopt, c10::nullopt, causal,
                                q_pos, kv_pos, remote_pos, scale, rope ? OptT(rope_cos) : c10::nullopt,
                                rope ? OptT(rope_sin) : c10::nullopt);
    double max_err = 0;
    for (int64_t b = 0; b < B; ++b)
      for (int64_t h = 0; h < H; ++h)
        for (int64_t i = 0; i < Tq; ++i) {
          const int64_t hk = h / (H / Hkv);
          std::vector<double> s, vals;  // scores and flattened values of visible keys
          auto add_key = [&](const std::vector<double>& key, const std::vector<double>& val) {
            double dot = 0;
            for (int64_t j = 0; j < d; ++j) dot += q[b][h][i][j].item<double>() * key[j];
            s.push_back(dot * scale);
            vals.insert(vals.end(), val.begin(), val.end());
          };
          for (int64_t t = 0; t < Tl; ++t) {
            if (causal && kv_pos[t].item<int64_t>() > q_pos[i].item<int64_t>()) continue;
            std::vector<double> key(d), val(d);
            for (int64_t j = 0; j < d; ++j) key[j] = k[b][hk][t][j].item<double>(), val[j] = v[b][hk][t][j].item<double>();
            add_key(key, val);
          }
          for (int64_t t = 0; t < Tr; ++t) {
            if (causal && remote_pos[t].item<int64_t>() > q_pos[i].item<int64_t>()) continue;
            bool missing = false;
            std::vector<double> key(d, 0.0), val(d, 0.0);
            for (int64_t g = 0; g < G; ++g) {
              int c = codes[b][t][g].item<int>();
              if (c < 0) { missing = true; break; }
              for (int64_t j = 0; j < d; ++j) key[j] += pk[g][c][hk][j].item<double>(), val[j] += pv[g][c][hk][j].item<double>();
            }
            if (missing) continue;
            if (rope) {  // key[:R] * cos + rotate_half(key[:R]) * sin
              std::vector<double> r(key);
              for (int64_t j = 0; j < R; ++j) {
                const double partner = j < R / 2 ? -key[j + R / 2] : key[j - R / 2];
                r[j] = key[j] * rope_cos[0][t][j].item<double>() +
                       partner * rope_sin[0][t][j].item<double>();
              }
              key = r;
            }
            add_key(key, val);
          }
          double mx = -std::numeric_limits<double>::infinity(), sum = 0;
          for (double x : s) mx = std::max(mx, x);
          for (double x : s) sum += std::exp(x - mx);
          const double ref_lse = s.empty() ? -std::numeric_limits<double>::infinity() : mx + std::log(sum);
          const double got_lse = lse[b][h][i].item<double>();
          if (s.empty()) {
            EXPECT(std::isinf(got_lse) && got_lse < 0, "lse of a row with no keys");
          } else {
            max_err = std::max(max_err, std::fabs(got_lse - ref_lse));
          }
          for (int64_t j = 0; j < d; ++j) {
            double o = 0;
            for (size_t t = 0; t < s.size(); ++t) o += std::exp(s[t] - ref_lse) * vals[t * d + j];
            max_err = std::max(max_err, std::fabs(out[b][h][i][j].item<double>() - o));
          }
        }
    EXPECT(max_err < 1e-4, "mixed_attention causal=%d rope=%d max error %g", int(causal),
           int(rope), max_err);
  }
}

void test_merge() {
  using Sig = std::tuple<Tensor, Tensor>(const Tensor&, const Tensor&, const Tensor&, const Tensor&);
  auto merge = op<Sig>("astra_C::merge_attention");
  Tensor oa = at::randn({3, 5, 8}), ob = at::randn({3, 5, 8});
  Tensor la = at::randn({3, 5}), lb = at::randn({3, 5});
  lb[0][0] = -std::numeric_limits<float>::infinity();
  auto [out, lse] = merge.call(oa, la, ob, lb);
  Tensor l = at::logaddexp(la, lb);
  Tensor ref = (at::exp(la - l).unsqueeze(-1) * oa + at::exp(lb - l).unsqueeze(-1) * ob);
  EXPECT(at::allclose(lse, l, 1e-5, 1e-5), "merged lse");
  EXPECT(at::allclose(out, ref, 1e-5, 1e-5), "merged out");
}

}  // namespace

// y = sum_k x * (w * scale + offset) + bias in double, per-row or grouped scales; the
// kernel rounds rows of up to 16 tokens to int16, so the bound includes that rounding.
void test_int8_linear() {
  auto lin = op<Tensor(const Tensor&, const Tensor&, const Tensor&, const OptT&, const OptT&)>(
      "astra_C::int8_linear");
  at::manual_seed(0);
  struct Case { int64_t M, N, K, ng; bool offset, bias; };
  for (Case c : {Case{1, 9, 64, 2, false, true}, Case{1, 13, 70, 1, false, false},
                 Case{3, 17, 96, 3, true, true}, Case{5, 8, 4100, 1, true, false},
                 Case{1, 33, 192, 6, true, false}, Case{20, 7, 64, 2, true, true}}) {
    Tensor x = at::randn({c.M, c.K});
    Tensor w = at::randint(-128, 128, {c.N, c.K}, at::kChar);
    Tensor sc = at::rand({c.N, c.ng}) + 0.1;
    Tensor off = at::randn({c.N, c.ng});
    Tensor b = at::randn({c.N});
    if (c.ng == 1) sc = sc.reshape({c.N}), off = off.reshape({c.N});
    Tensor y = lin.call(x, w, sc, c.bias ? OptT(b) : OptT(), c.offset ? OptT(off) : OptT());
    const int64_t gs = c.K / c.ng;
    auto xa = x.accessor<float, 2>();
    auto wa = w.accessor<int8_t, 2>();
    const float* s = sc.data_ptr<float>();
    const float* o = off.data_ptr<float>();
    for (int64_t m = 0; m < c.M; ++m) {
      double amax = 0;
      for (int64_t k = 0; k < c.K; ++k) amax = std::max(amax, std::abs(double(xa[m][k])));
      for (int64_t n = 0; n < c.N; ++n) {
        double ref = c.bias ? b[n].item<double>() : 0.0, mag = 0;
        for (int64_t k = 0; k < c.K; ++k) {
          const int64_t g = k / gs;
          const double wk = wa[n][k] * double(s[n * c.ng + g]) + (c.offset ? o[n * c.ng + g] : 0);
          ref += xa[m][k] * wk;
          mag += std::abs(wk);
        }
        const double tol = 0.5 * amax / 32767 * mag + 1e-5 * mag * amax + 1e-4;
        const double got = y[m][n].item<double>();
        EXPECT(std::abs(got - ref) <= tol, "int8_linear M=%ld N=%ld K=%ld ng=%ld [%ld,%ld]: "
               "%g vs %g", c.M, c.N, c.K, c.ng, m, n, got, ref);
      }
    }
  }
}

int main() {
  test_pack();
  test_int8_linear();
  test_vq_encode();
  test_mixed_attention();
  test_merge();
  if (failures) {
    std::printf("%d check(s) failed\n", failures);
    return 1;
  }
  std::printf("all C++ kernel checks passed\n");
  return 0;
}
