// astra::mixed_attention and astra::merge_attention on the CPU.
//
// mixed_attention is flash-style: one work item is (batch b, kv head h, query tile);
// it stacks the rep = H/Hkv query heads that share kv head h into one block of
// rows = rep x bq query rows (row r = head_in_group * bq + query), so each key tile
// that is loaded or gathered serves all of them. Items run in parallel
// (at::parallel_for); query tiles are visited in zig-zag order so that the static
// split hands each thread a similar amount of causal work.
// Per item, key tiles of kKeyTile: first the local keys, then the remote ones.
// Remote keys come from codes (gathered from the projected codebooks pk/pv into a
// per-tile scratch, sum over groups in fp32, rounded to the table dtype as the
// reference does) or from materialized remote_k/remote_v. For each tile:
//   S = (scale q) . K^T                         tile_gemm, fp32
//   mask: invisible (causal position, missing or out-of-range code) -> -inf
//   online softmax: running max m, sum l; acc *= e^(m_old - m_new)
//   acc += e^(S - m) . V                        tile_gemm, fp32
// Tiles that no query of the item can see are skipped before any load; the mask
// is applied only to tiles that need it. Rows that see no key give zeros, lse=-inf.
//
// merge_attention combines two partial results row by row (scalar weights,
// vectorized over d), in parallel over rows.
#include "astra.h"
#include "cpu/cpu_utils.h"

#include <torch/library.h>

#include <cmath>
#include <limits>
#include <vector>

namespace astra {
namespace {

using cpu::fVec;

// Tile sizes from the AVX-512 dev machine (1 thread, B=1, H=12, d=64, 4096 keys):
// 128 x 128 ran ~13% faster than 64 x 64 (per-row softmax overhead spread over more
// keys); 128 x 256 and 256 x 128 gained only ~2% more.
constexpr int64_t kKeyTile = 128;    // keys per tile; a multiple of fVec::size()
constexpr int64_t kRowTarget = 128;  // query rows (heads x positions) per work item
constexpr float kNegInf = -std::numeric_limits<float>::infinity();

template <typename scalar_t>
struct AttnParams {
  const scalar_t *q, *k, *v;            // [B,H,Tq,d], [B,Hkv,Tl,d] x2
  bool use_codes;                       // remote keys from codes (else rk/rv)
  const int32_t* codes;                 // [B,Tr,G]
  const scalar_t *pk, *pv;              // [G,K,Hkv,d]
  const scalar_t *rk, *rv;              // [B,Hkv,Tr,d]
  const int64_t *q_pos, *kv_pos, *remote_pos;  // causal only
  int64_t B, H, Hkv, Tq, Tl, Tr, d, G, K;
  bool causal;
  float scale;
  scalar_t* out;  // [B,H,Tq,d]
  float* lse;     // [B,H,Tq]
};

inline void scale_row(float* x, int64_t n, float a) {
  constexpr int64_t kV = fVec::size();
  const fVec va(a);
  int64_t j = 0;
  for (; j + kV <= n; j += kV) (fVec::loadu(x + j) * va).store(x + j);
  for (; j < n; ++j) x[j] *= a;
}

// State and scratch of one thread; one work item at a time.
template <typename scalar_t>
class AttnWorker {
 public:
  AttnWorker(const AttnParams<scalar_t>& p, int64_t bq_max)
      : p_(p), d_(p.d), rep_(p.H / p.Hkv), bq_max_(bq_max),
        kp_(kKeyTile), ok_(kKeyTile), qp_(bq_max_) {
    const int64_t rows = rep_ * bq_max_;
    buf_ = cpu::scratch_f32(2 * rows * d_ + rows * kKeyTile + 2 * rows + 3 * kKeyTile * d_);
    q_ = buf_.data_ptr<float>();      // [rows, d] scaled queries
    acc_ = q_ + rows * d_;            // [rows, d] unnormalized output
    s_ = acc_ + rows * d_;            // [rows, kKeyTile] scores, then probabilities
    m_ = s_ + rows * kKeyTile;        // [rows] running max
    l_ = m_ + rows;                   // [rows] running sum
    kt_ = l_ + rows;                  // [d, kKeyTile] K tile transposed
    kf_ = kt_ + d_ * kKeyTile;        // [kKeyTile, d] K tile in fp32 (when converted)
    vf_ = kf_ + kKeyTile * d_;        // [kKeyTile, d] V tile in fp32 (when converted)
  }

  void run(int64_t b, int64_t h, int64_t q0) {
    bq_ = std::min(bq_max_, p_.Tq - q0);
    rows_ = rep_ * bq_;
    load_queries(b, h, q0);
    const int64_t kv_off = (b * p_.Hkv + h) * p_.Tl * d_;
    for (int64_t j0 = 0; j0 < p_.Tl; j0 += kKeyTile) {
      const int64_t bk = std::min(kKeyTile, p_.Tl - j0);
      for (int64_t j = 0; j < bk; ++j) {
        kp_[j] = p_.causal ? p_.kv_pos[j0 + j] : 0;
        ok_[j] = 1;
      }
      bool need_mask;
      if (!visible(bk, &need_mask)) continue;
      const float* v = load_kv(p_.k + kv_off + j0 * d_, p_.v + kv_off + j0 * d_, bk);
      attend(v, bk, need_mask);
    }
    const int64_t r_off = (b * p_.Hkv + h) * p_.Tr * d_;
    for (int64_t j0 = 0; j0 < p_.Tr; j0 += kKeyTile) {
      const int64_t bk = std::min(kKeyTile, p_.Tr - j0);
      for (int64_t j = 0; j < bk; ++j) {
        kp_[j] = p_.causal ? p_.remote_pos[j0 + j] : 0;
        ok_[j] = p_.use_codes ? code_ok(p_.codes + (b * p_.Tr + j0 + j) * p_.G) : 1;
      }
      bool need_mask;
      if (!visible(bk, &need_mask)) continue;
      const float* v = p_.use_codes ? gather_kv(b, h, j0, bk)
                                : load_kv(p_.rk + r_off + j0 * d_, p_.rv + r_off + j0 * d_, bk);
      attend(v, bk, need_mask);
    }
    store(b, h, q0);
  }

 private:
  void load_queries(int64_t b, int64_t h, int64_t q0) {
    for (int64_t hl = 0; hl < rep_; ++hl) {
      const scalar_t* src = p_.q + ((b * p_.H + h * rep_ + hl) * p_.Tq + q0) * d_;
      cpu::to_f32(src, q_ + hl * bq_ * d_, bq_ * d_);
    }
    scale_row(q_, rows_ * d_, p_.scale);
    std::fill(acc_, acc_ + rows_ * d_, 0.f);
    std::fill(m_, m_ + rows_, kNegInf);
    std::fill(l_, l_ + rows_, 0.f);
    qmin_ = std::numeric_limits<int64_t>::max();
    qmax_ = std::numeric_limits<int64_t>::min();
    for (int64_t i = 0; i < bq_; ++i) {
      qp_[i] = p_.causal ? p_.q_pos[q0 + i] : 0;
      qmin_ = std::min(qmin_, qp_[i]);
      qmax_ = std::max(qmax_, qp_[i]);
    }
  }

  bool code_ok(const int32_t* c) const {
    bool ok = true;
    for (int64_t g = 0; g < p_.G; ++g) ok &= (c[g] >= 0) & (c[g] < p_.K);
    return ok;
  }

  // Whether any query of the item sees a key of the tile; *need_mask: some does not.
  bool visible(int64_t bk, bool* need_mask) const {
    int64_t n_ok = 0;
    int64_t kmin = std::numeric_limits<int64_t>::max();
    int64_t kmax = std::numeric_limits<int64_t>::min();
    for (int64_t j = 0; j < bk; ++j) {
      if (!ok_[j]) continue;
      ++n_ok;
      kmin = std::min(kmin, kp_[j]);
      kmax = std::max(kmax, kp_[j]);
    }
    if (n_ok == 0 || (p_.causal && kmin > qmax_)) return false;
    *need_mask = n_ok < bk || (p_.causal && kmax > qmin_);
    return true;
  }

  // K rows [bk, d] -> kt_ (fp32, transposed); returns V rows in fp32 [bk, d].
  const float* load_kv(const scalar_t* k, const scalar_t* v, int64_t bk) {
    const float* kf;
    const float* vf;
    if constexpr (std::is_same_v<scalar_t, float>) {
      kf = k;
      vf = v;
    } else {
      cpu::to_f32(k, kf_, bk * d_);
      cpu::to_f32(v, vf_, bk * d_);
      kf = kf_;
      vf = vf_;
    }
    at::vec::transpose_mxn<float>(kf, d_, kt_, kKeyTile, static_cast<int>(bk),
                                  static_cast<int>(d_));
    return vf;
  }

  // Remote key/value j = sum_g pk/pv[g, codes[b, j0+j, g], h]; missing keys get zeros
  // (masked anyway; V must be finite because P = 0 multiplies it).
  const float* gather_kv(int64_t b, int64_t h, int64_t j0, int64_t bk) {
    for (int64_t j = 0; j < bk; ++j) {
      float* kr = kf_ + j * d_;
      float* vr = vf_ + j * d_;
      if (!ok_[j] || p_.G == 0) {  // G = 0: an empty sum, a zero key/value
        std::fill(kr, kr + d_, 0.f);
        std::fill(vr, vr + d_, 0.f);
        continue;
      }
      const int32_t* c = p_.codes + (b * p_.Tr + j0 + j) * p_.G;
      for (int64_t g = 0; g < p_.G; ++g) {
        const int64_t off = ((g * p_.K + c[g]) * p_.Hkv + h) * d_;
        cpu::add_to_f32(p_.pk + off, kr, d_, g == 0);
        cpu::add_to_f32(p_.pv + off, vr, d_, g == 0);
      }
      if (p_.G > 1) {  // the reference materializes remote K/V in the table dtype
        cpu::round_through<scalar_t>(kr, d_);
        cpu::round_through<scalar_t>(vr, d_);
      }
    }
    at::vec::transpose_mxn<float>(kf_, d_, kt_, kKeyTile, static_cast<int>(bk),
                                  static_cast<int>(d_));
    return vf_;
  }

  void attend(const float* v, int64_t bk, bool need_mask) {
    constexpr int64_t kV = fVec::size();
    const int64_t bk_pad = cpu::round_up(bk, kV);
    cpu::tile_gemm(rows_, bk, d_, d_, kKeyTile, kKeyTile, false, q_, kt_, s_);
    for (int64_t r = 0; r < rows_; ++r) {
      float* s = s_ + r * kKeyTile;
      if (need_mask) {
        const int64_t qp = qp_[r % bq_];
        for (int64_t j = 0; j < bk; ++j) s[j] = (ok_[j] && kp_[j] <= qp) ? s[j] : kNegInf;
      }
      std::fill(s + bk, s + bk_pad, kNegInf);

      fVec vmax(kNegInf);
      for (int64_t j = 0; j < bk_pad; j += kV) vmax = at::vec::maximum(vmax, fVec::loadu(s + j));
      const float tile_max =
          at::vec::vec_reduce_all<float>([](fVec& a, fVec& b) { return at::vec::maximum(a, b); },
                                         vmax);
      const float m_new = std::max(m_[r], tile_max);
      if (m_new == kNegInf) {  // nothing visible to this row yet: contributes nothing
        std::fill(s, s + bk_pad, 0.f);
        continue;
      }
      const fVec vm(m_new);
      fVec vsum(0.f);
      for (int64_t j = 0; j < bk_pad; j += kV) {
        const fVec e = (fVec::loadu(s + j) - vm).exp_u20();
        e.store(s + j);
        vsum = vsum + e;
      }
      const float alpha = std::exp(m_[r] - m_new);  // 0 on the first visible tile
      l_[r] = l_[r] * alpha +
              at::vec::vec_reduce_all<float>([](fVec& a, fVec& b) { return a + b; }, vsum);
      if (alpha != 1.f) scale_row(acc_ + r * d_, d_, alpha);
      m_[r] = m_new;
    }
    cpu::tile_gemm(rows_, d_, bk, kKeyTile, d_, d_, true, s_, v, acc_);
  }

  void store(int64_t b, int64_t h, int64_t q0) {
    for (int64_t r = 0; r < rows_; ++r) {
      const int64_t row = (b * p_.H + h * rep_ + r / bq_) * p_.Tq + q0 + r % bq_;
      float* a = acc_ + r * d_;
      if (l_[r] > 0.f) {
        scale_row(a, d_, 1.f / l_[r]);
        p_.lse[row] = m_[r] + std::log(l_[r]);
      } else {
        std::fill(a, a + d_, 0.f);
        p_.lse[row] = kNegInf;
      }
      cpu::from_f32(a, p_.out + row * d_, d_);
    }
  }

  const AttnParams<scalar_t>& p_;
  const int64_t d_, rep_, bq_max_;
  std::vector<int64_t> kp_;  // key positions of the tile (0 when not causal)
  std::vector<uint8_t> ok_;  // key present (code in range)
  std::vector<int64_t> qp_;  // query positions of the item (0 when not causal)
  at::Tensor buf_;
  float *q_, *acc_, *s_, *m_, *l_, *kt_, *kf_, *vf_;
  int64_t bq_ = 0, rows_ = 0, qmin_ = 0, qmax_ = 0;
};

template <typename scalar_t>
void mixed_attention_kernel(const AttnParams<scalar_t>& p) {
  const int64_t rep = p.H / p.Hkv;
  int64_t bq = std::max<int64_t>(1, std::min(p.Tq, kRowTarget / rep));
  // Smaller query tiles when there are too few items to keep every thread busy.
  while (bq > 16 && p.B * p.Hkv * cpu::ceil_div(p.Tq, bq) < 2 * at::get_num_threads())
    bq = cpu::ceil_div(bq, 2);
  const int64_t n_qt = cpu::ceil_div(p.Tq, bq);
  at::parallel_for(0, p.B * p.Hkv * n_qt, 1, [&](int64_t begin, int64_t end) {
    AttnWorker<scalar_t> w(p, bq);
    for (int64_t item = begin; item < end; ++item) {
      const int64_t bh = item / n_qt, z = item % n_qt;
      const int64_t qt = (z % 2 == 0) ? z / 2 : n_qt - 1 - z / 2;  // zig-zag: 0, n-1, 1, ...
      w.run(bh / p.Hkv, bh % p.Hkv, qt * bq);
    }
    cpu::tile_gemm_done();
  });
}

bool is_float_type(const Tensor& t) {
  const auto s = t.scalar_type();
  return s == at::kFloat || s == at::kHalf || s == at::kBFloat16;
}

void check_positions(const OptTensor& pos, int64_t n, const char* name) {
  TORCH_CHECK(pos.has_value() && pos->defined(), "mixed_attention: causal needs ", name);
  TORCH_CHECK(pos->scalar_type() == at::kLong && pos->dim() == 1 && pos->is_contiguous() &&
                  pos->numel() == n,
              "mixed_attention: ", name, " must be contiguous int64 [", n, "], got ",
              pos->scalar_type(), " ", pos->sizes());
}

void merge_row(const float* a, float wa, const float* b, float wb, float* o, int64_t d) {
  constexpr int64_t kV = fVec::size();
  const fVec va(wa), vb(wb);
  int64_t j = 0;
  for (; j + kV <= d; j += kV)
    at::vec::fmadd(fVec::loadu(a + j), va, fVec::loadu(b + j) * vb).store(o + j);
  for (; j < d; ++j) o[j] = a[j] * wa + b[j] * wb;
}

template <typename scalar_t>
void merge_attention_kernel(const scalar_t* out_a, const float* lse_a, const scalar_t* out_b,
                            const float* lse_b, scalar_t* out, float* lse, int64_t rows,
                            int64_t d) {
  const int64_t grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(d, 1));
  at::parallel_for(0, rows, grain, [&](int64_t begin, int64_t end) {
    std::vector<float> fa, fb, fo;
    if constexpr (!std::is_same_v<scalar_t, float>) fa.resize(d), fb.resize(d), fo.resize(d);
    for (int64_t r = begin; r < end; ++r) {
      const float la = lse_a[r], lb = lse_b[r];
      const float mx = std::max(la, lb), mn = std::min(la, lb);
      scalar_t* o = out + r * d;
      if (mx == kNegInf) {  // neither part saw a key
        lse[r] = kNegInf;
        std::fill(o, o + d, scalar_t(0));
        continue;
      }
      const float l = mx + std::log1p(std::exp(mn - mx));  // logaddexp
      lse[r] = l;
      const float wa = std::exp(la - l), wb = std::exp(lb - l);
      if constexpr (std::is_same_v<scalar_t, float>) {
        merge_row(out_a + r * d, wa, out_b + r * d, wb, o, d);
      } else {
        cpu::to_f32(out_a + r * d, fa.data(), d);
        cpu::to_f32(out_b + r * d, fb.data(), d);
        merge_row(fa.data(), wa, fb.data(), wb, fo.data(), d);
        cpu::from_f32(fo.data(), o, d);
      }
    }
  });
}

}  // namespace

std::tuple<Tensor, Tensor> mixed_attention_cpu(
    const Tensor& q, const Tensor& k, const Tensor& v, const OptTensor& codes,
    const OptTensor& pk, const OptTensor& pv, const OptTensor& remote_k,
    const OptTensor& remote_v, bool causal, const OptTensor& q_pos,
    const OptTensor& kv_pos, const OptTensor& remote_pos, c10::optional<double> scale) {
  TORCH_CHECK(q.dim() == 4 && k.dim() == 4 && v.dim() == 4,
              "mixed_attention: q, k, v must be 4-D");
  TORCH_CHECK(q.is_contiguous() && k.is_contiguous() && v.is_contiguous(),
              "mixed_attention: q, k, v must be contiguous");
  TORCH_CHECK(is_float_type(q) && k.scalar_type() == q.scalar_type() &&
                  v.scalar_type() == q.scalar_type(),
              "mixed_attention: q, k, v must share one dtype of float32/float16/bfloat16");
  const int64_t B = q.size(0), H = q.size(1), Tq = q.size(2), d = q.size(3);
  const int64_t Hkv = k.size(1), Tl = k.size(2);
  TORCH_CHECK(d >= 1, "mixed_attention: head dim must be >= 1");
  TORCH_CHECK(k.size(0) == B && k.size(3) == d && v.sizes() == k.sizes(),
              "mixed_attention: k, v must be [B, Hkv, Tl, d] matching q ", q.sizes(), ", got ",
              k.sizes(), " and ", v.sizes());
  TORCH_CHECK(Hkv >= 1 && H % Hkv == 0, "mixed_attention: H=", H,
              " is not a multiple of Hkv=", Hkv);

  const bool has_codes = codes.has_value() && codes->defined();
  const bool has_remote = remote_k.has_value() && remote_k->defined();
  TORCH_CHECK(!(has_codes && has_remote), "mixed_attention: pass codes or remote_k/v, not both");
  int64_t Tr = 0, G = 0, K = 0;
  if (has_codes) {
    TORCH_CHECK(pk.has_value() && pk->defined() && pv.has_value() && pv->defined(),
                "mixed_attention: codes need pk and pv");
    TORCH_CHECK(codes->scalar_type() == at::kInt && codes->dim() == 3 &&
                    codes->is_contiguous() && codes->size(0) == B,
                "mixed_attention: codes must be contiguous int32 [B, Tr, G]");
    TORCH_CHECK(pk->dim() == 4 && pk->is_contiguous() && pv->is_contiguous() &&
                    pk->scalar_type() == q.scalar_type() &&
                    pv->scalar_type() == q.scalar_type() && pv->sizes() == pk->sizes() &&
                    pk->size(2) == Hkv && pk->size(3) == d,
                "mixed_attention: pk, pv must be contiguous [G, K, Hkv, d] in q's dtype");
    G = pk->size(0);
    K = pk->size(1);
    TORCH_CHECK(codes->size(2) == G && K >= 1, "mixed_attention: codes ", codes->sizes(),
                " do not match pk ", pk->sizes());
    Tr = codes->size(1);
  } else if (has_remote) {
    TORCH_CHECK(remote_v.has_value() && remote_v->defined(),
                "mixed_attention: remote_k needs remote_v");
    TORCH_CHECK(remote_k->dim() == 4 && remote_k->is_contiguous() &&
                    remote_v->is_contiguous() && remote_k->scalar_type() == q.scalar_type() &&
                    remote_v->scalar_type() == q.scalar_type() &&
                    remote_v->sizes() == remote_k->sizes() && remote_k->size(0) == B &&
                    remote_k->size(1) == Hkv && remote_k->size(3) == d,
                "mixed_attention: remote_k, remote_v must be contiguous [B, Hkv, Tr, d] in "
                "q's dtype");
    Tr = remote_k->size(2);
  }
  if (causal) {
    check_positions(q_pos, Tq, "q_pos");
    check_positions(kv_pos, Tl, "kv_pos");
    if (Tr > 0) check_positions(remote_pos, Tr, "remote_pos");
  }

  Tensor out = at::empty_like(q);
  Tensor lse = at::empty({B, H, Tq}, q.options().dtype(at::kFloat));
  if (out.numel() == 0) return {out, lse};
  const float sc = static_cast<float>(scale.has_value() ? *scale : 1.0 / std::sqrt(double(d)));

  ASTRA_DISPATCH_FLOAT_TYPES(q.scalar_type(), "mixed_attention_cpu", [&] {
    AttnParams<scalar_t> p{};
    p.q = q.data_ptr<scalar_t>();
    p.k = k.data_ptr<scalar_t>();
    p.v = v.data_ptr<scalar_t>();
    p.use_codes = has_codes;
    if (has_codes) {
      p.codes = codes->data_ptr<int32_t>();
      p.pk = pk->data_ptr<scalar_t>();
      p.pv = pv->data_ptr<scalar_t>();
    } else if (has_remote) {
      p.rk = remote_k->data_ptr<scalar_t>();
      p.rv = remote_v->data_ptr<scalar_t>();
    }
    if (causal) {
      p.q_pos = q_pos->data_ptr<int64_t>();
      p.kv_pos = kv_pos->data_ptr<int64_t>();
      p.remote_pos = Tr > 0 ? remote_pos->data_ptr<int64_t>() : nullptr;
    }
    p.B = B, p.H = H, p.Hkv = Hkv, p.Tq = Tq, p.Tl = Tl, p.Tr = Tr, p.d = d, p.G = G, p.K = K;
    p.causal = causal;
    p.scale = sc;
    p.out = out.data_ptr<scalar_t>();
    p.lse = lse.data_ptr<float>();
    mixed_attention_kernel<scalar_t>(p);
  });
  return {out, lse};
}

std::tuple<Tensor, Tensor> merge_attention_cpu(const Tensor& out_a, const Tensor& lse_a,
                                               const Tensor& out_b, const Tensor& lse_b) {
  TORCH_CHECK(out_a.dim() >= 1 && out_a.is_contiguous() && out_b.is_contiguous() &&
                  lse_a.is_contiguous() && lse_b.is_contiguous(),
              "merge_attention: inputs must be contiguous, out_* at least 1-D");
  TORCH_CHECK(is_float_type(out_a) && out_b.scalar_type() == out_a.scalar_type(),
              "merge_attention: out_a, out_b must share one dtype of float32/float16/bfloat16");
  TORCH_CHECK(lse_a.scalar_type() == at::kFloat && lse_b.scalar_type() == at::kFloat,
              "merge_attention: lse_a, lse_b must be float32");
  TORCH_CHECK(out_b.sizes() == out_a.sizes() && lse_b.sizes() == lse_a.sizes() &&
                  lse_a.sizes() == out_a.sizes().slice(0, out_a.dim() - 1),
              "merge_attention: shapes do not match: out ", out_a.sizes(), " / ", out_b.sizes(),
              ", lse ", lse_a.sizes(), " / ", lse_b.sizes());
  Tensor out = at::empty_like(out_a);
  Tensor lse = at::empty_like(lse_a);
  const int64_t d = out_a.size(-1), rows = lse_a.numel();
  if (out.numel() == 0 && rows == 0) return {out, lse};
  ASTRA_DISPATCH_FLOAT_TYPES(out_a.scalar_type(), "merge_attention_cpu", [&] {
    merge_attention_kernel<scalar_t>(out_a.data_ptr<scalar_t>(), lse_a.data_ptr<float>(),
                                     out_b.data_ptr<scalar_t>(), lse_b.data_ptr<float>(),
                                     out.data_ptr<scalar_t>(), lse.data_ptr<float>(), rows, d);
  });
  return {out, lse};
}

TORCH_LIBRARY_IMPL(astra_C, CPU, m) {
  m.impl("mixed_attention", &mixed_attention_cpu);
  m.impl("merge_attention", &merge_attention_cpu);
}

}  // namespace astra
