// The pybind11 module ppml_fast._C: kernels on raw buffers. The Python layer (ppml_fast/ops)
// validates arguments, allocates outputs and scratch with torch, and passes data pointers,
// sizes and dtype tags here; this file only unpacks them and releases the GIL.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <algorithm>
#include <cstdint>
#include <stdexcept>
#include <string>
#include <tuple>
#include <vector>

#include "include/ppml/kernels.h"
#include "include/ppml/embedding.h"
#include "include/ppml/noise.h"
#include "include/ppml/recurrent.h"
#include "include/ppml/secagg.h"
#include "cpu/target.h"

namespace py = pybind11;
using namespace ppml;

namespace {

std::vector<const void*> as_const_ptrs(const std::vector<uintptr_t>& v) {
  std::vector<const void*> out(v.size());
  for (size_t i = 0; i < v.size(); ++i) out[i] = reinterpret_cast<const void*>(v[i]);
  return out;
}

// In-place noise on contiguous buffers that share memory would race between threads (and
// draw twice for the shared elements): rejected before any write, naming both tensors.
void check_disjoint(const std::string& name, const std::vector<uintptr_t>& ptrs,
                    const std::vector<int64_t>& numels, const std::vector<int>& dtypes) {
  std::vector<std::tuple<uintptr_t, uintptr_t, size_t>> spans;
  spans.reserve(ptrs.size());
  for (size_t i = 0; i < ptrs.size(); ++i) {
    if (numels[i] <= 0) continue;
    const uintptr_t bytes = static_cast<uintptr_t>(numels[i]) *
                            static_cast<uintptr_t>(dtype_size(static_cast<DType>(dtypes[i])));
    spans.emplace_back(ptrs[i], ptrs[i] + bytes, i);
  }
  std::sort(spans.begin(), spans.end());
  for (size_t k = 1; k < spans.size(); ++k) {
    if (std::get<0>(spans[k]) < std::get<1>(spans[k - 1])) {
      size_t a = std::get<2>(spans[k - 1]), b = std::get<2>(spans[k]);
      if (a > b) std::swap(a, b);
      throw std::invalid_argument(name + "[" + std::to_string(a) + "] and " + name + "[" +
                                  std::to_string(b) + "] share memory; pass distinct tensors");
    }
  }
}

DType as_dtype(int tag) {
  if (tag < 0 || tag > 3) throw std::invalid_argument("dtype tag must be 0..3");
  return static_cast<DType>(tag);
}

void clip_accumulate(int device, intptr_t stream, int dtype, int64_t rows,
                     const std::vector<uintptr_t>& seg_ptrs, const std::vector<int64_t>& seg_widths,
                     const std::vector<uintptr_t>& row_ptrs, const std::vector<uintptr_t>& out_ptrs,
                     uintptr_t norms, uintptr_t row_scale, int mode, bool per_layer,
                     const std::vector<double>& max_norms, double eps, double gamma,
                     uintptr_t scratch, int num_threads) {
  ClipProblem p;
  p.device = device;
  p.stream = stream;
  p.dtype = as_dtype(dtype);
  p.rows = rows;
  p.seg_ptrs = as_const_ptrs(seg_ptrs);
  p.seg_widths = seg_widths;
  p.row_ptrs = as_const_ptrs(row_ptrs);
  p.out_ptrs.resize(out_ptrs.size());
  for (size_t i = 0; i < out_ptrs.size(); ++i) p.out_ptrs[i] = reinterpret_cast<void*>(out_ptrs[i]);
  p.norms = reinterpret_cast<double*>(norms);
  p.row_scale = reinterpret_cast<const double*>(row_scale);
  if (mode < 0 || mode > 2) throw std::invalid_argument("clip mode tag must be 0..2");
  p.mode = static_cast<ClipMode>(mode);
  p.per_layer = per_layer;
  p.max_norms = max_norms;
  p.eps = eps;
  p.gamma = gamma;
  p.scratch = reinterpret_cast<double*>(scratch);
  p.num_threads = num_threads;
  // Shapes are checked in Python; these guard the memory safety of the kernel itself.
  if (rows < 0) throw std::invalid_argument("rows must be >= 0");
  if (rows > 0 && p.norms == nullptr) throw std::invalid_argument("norms must not be null");
  for (int64_t w : seg_widths)
    if (w < 0) throw std::invalid_argument("segment widths must be >= 0");
  const size_t L = p.seg_widths.size();
  if (p.out_ptrs.size() != L) throw std::invalid_argument("one output per segment expected");
  if (p.row_ptrs.empty() ? p.seg_ptrs.size() != L
                         : (L != 1 || p.row_ptrs.size() != static_cast<size_t>(rows)))
    throw std::invalid_argument("segment / row pointer tables do not match the shapes");
  if (p.max_norms.size() != (per_layer ? L : 1)) throw std::invalid_argument("max_norms length");
  py::gil_scoped_release release;
  if (device < 0) {
    cpu::clip_accumulate(p);
  } else {
    if (!p.row_ptrs.empty()) throw std::invalid_argument("row pointer lists are CPU only");
    cuda::clip_accumulate(p);
  }
}

uint64_t gaussian_noise(int device, intptr_t stream, const std::vector<uintptr_t>& ptrs,
                        const std::vector<int64_t>& numels, const std::vector<int>& dtypes,
                        double stddev, double denominator, bool divide, bool secure,
                        uint64_t seed, uint64_t offset, const std::vector<uint32_t>& key_words,
                        int num_threads, const std::string& name) {
  if (ptrs.size() != numels.size() || ptrs.size() != dtypes.size())
    throw std::invalid_argument("ptrs, numels and dtypes must have the same length");
  NoiseProblem p;
  p.device = device;
  p.stream = stream;
  for (size_t i = 0; i < ptrs.size(); ++i)
    p.tensors.push_back({reinterpret_cast<void*>(ptrs[i]), numels[i], as_dtype(dtypes[i])});
  check_disjoint(name, ptrs, numels, dtypes);  // after as_dtype has validated the tags
  p.stddev = stddev;
  p.denominator = denominator;
  p.divide = divide;
  p.secure = secure;
  p.seed = seed;
  p.offset = offset;
  p.num_threads = num_threads;
  uint64_t blocks = 0;
  for (auto& t : p.tensors) {
    if (t.numel < 0) throw std::invalid_argument(name + ": a tensor has a negative size");
    blocks += noise_blocks(t.numel);  // < 2^63 in total: each numel < 2^63, and memory bounds it
  }
  // Philox counters and ChaCha20 block indices are 64-bit; the call's blocks are
  // [offset, offset + blocks), which must not wrap (it would repeat noise)
  if (blocks > UINT64_MAX - offset)
    throw std::invalid_argument(name + ": noise offset " + std::to_string(offset) + " + " +
                                std::to_string(blocks) +
                                " blocks passes 2^64: the counter would wrap and repeat noise");
  if (secure) {
    if (key_words.size() != 11) throw std::invalid_argument("secure mode needs 11 key words");
    for (int i = 0; i < 8; ++i) p.key.key[i] = key_words[i];
    for (int i = 0; i < 3; ++i) p.key.nonce[i] = key_words[8 + i];
  }
  {
    py::gil_scoped_release release;
    if (device < 0) {
      cpu::gaussian_noise(p);
    } else {
      cuda::gaussian_noise(p);
    }
  }
  return offset + blocks;
}

// Secure aggregation masks on a buffer of n ring elements (int32 storage viewed as uint32):
// seeds is num_seeds * 32 bytes, signs num_seeds int8 values (+1 / -1), both on x's device.
void secagg_mask(int device, intptr_t stream, uintptr_t x, int64_t n, uintptr_t seeds,
                 uintptr_t signs, int64_t num_seeds, int num_threads) {
  if (n < 0 || num_seeds < 0) throw std::invalid_argument("n and num_seeds must be >= 0");
  if (n > kSecAggMaxElements)
    throw std::invalid_argument("secagg_mask covers at most 2^36 elements (2^32 ChaCha20 blocks)");
  if (n > 0 && num_seeds > 0 && (x == 0 || seeds == 0 || signs == 0))
    throw std::invalid_argument("x, seeds and signs must not be null");
  SecAggMaskProblem p;
  p.x = reinterpret_cast<uint32_t*>(x);
  p.n = n;
  p.seeds = reinterpret_cast<const uint8_t*>(seeds);
  p.signs = reinterpret_cast<const int8_t*>(signs);
  p.num_seeds = num_seeds;
  p.num_threads = num_threads;
  p.stream = stream;
  p.device = device;
  py::gil_scoped_release release;
  if (device < 0) {
    cpu::secagg_mask(p);
  } else {
    cuda::secagg_mask(p);
  }
}

// The LSTM's sequential loops (include/ppml/recurrent.h), CPU, float32 / float64. Shapes and
// contiguity are checked in Python (privacy/recurrent_native.py); these guard the kernel's own
// memory safety.
DType lstm_dtype(int tag) {
  DType t = as_dtype(tag);
  if (t != DType::kFloat32 && t != DType::kFloat64)
    throw std::invalid_argument("the LSTM loops take float32 or float64 (dtype tag 0 or 1)");
  return t;
}

void check_lstm_sizes(int64_t steps, int64_t batch, int64_t hidden) {
  if (steps < 0 || batch < 0 || hidden < 0)
    throw std::invalid_argument("steps, batch and hidden must be >= 0");
}

void lstm_cells(int dtype, int64_t steps, int64_t batch, int64_t hidden, uintptr_t ig, uintptr_t f,
                int64_t f_row, uintptr_t c0, uintptr_t c) {
  LstmCellsProblem p;
  p.dtype = lstm_dtype(dtype);
  check_lstm_sizes(steps, batch, hidden);
  if (f_row < hidden) throw std::invalid_argument("f_row must be >= hidden");
  if (steps * batch * hidden > 0 && (ig == 0 || f == 0 || c0 == 0 || c == 0))
    throw std::invalid_argument("ig, f, c0 and c must not be null");
  p.steps = steps;
  p.batch = batch;
  p.hidden = hidden;
  p.ig = reinterpret_cast<const void*>(ig);
  p.f = reinterpret_cast<const void*>(f);
  p.f_row = f_row;
  p.c0 = reinterpret_cast<const void*>(c0);
  p.c = reinterpret_cast<void*>(c);
  py::gil_scoped_release release;
  cpu::lstm_cells(p);
}

void embedding_norms(int dtype, int64_t batch, int64_t seq, int64_t dim, uintptr_t idx, uintptr_t g,
                     int64_t pad, uintptr_t sq, uintptr_t norm_sum, int num_threads) {
  EmbeddingNormsProblem p;
  p.dtype = as_dtype(dtype);
  if (p.dtype != DType::kFloat32 && p.dtype != DType::kFloat64)
    throw std::invalid_argument("embedding_norms takes float32 or float64 gradients (dtype tag 0 or 1)");
  if (batch < 0 || seq < 0 || dim < 0) throw std::invalid_argument("batch, seq and dim must be >= 0");
  if (batch > 0 && (sq == 0 || norm_sum == 0)) throw std::invalid_argument("sq and norm_sum must not be null");
  if (batch * seq > 0 && (idx == 0 || (dim > 0 && g == 0)))
    throw std::invalid_argument("idx and g must not be null");
  p.batch = batch;
  p.seq = seq;
  p.dim = dim;
  p.idx = reinterpret_cast<const int64_t*>(idx);
  p.g = reinterpret_cast<const void*>(g);
  p.pad = pad;
  p.sq = reinterpret_cast<double*>(sq);
  p.norm_sum = reinterpret_cast<double*>(norm_sum);
  p.num_threads = num_threads;
  py::gil_scoped_release release;
  cpu::embedding_norms(p);
}

void lstm_forward(int dtype, int64_t steps, int64_t batch, int64_t hidden, uintptr_t pre,
                  uintptr_t w_hh_t, uintptr_t h0, uintptr_t c0, uintptr_t h, uintptr_t c,
                  uintptr_t p4, uintptr_t po, uintptr_t dc_dm) {
  LstmForwardProblem p;
  p.dtype = lstm_dtype(dtype);
  check_lstm_sizes(steps, batch, hidden);
  if (steps * batch * hidden > 0 &&
      (pre == 0 || w_hh_t == 0 || h0 == 0 || c0 == 0 || h == 0 || c == 0 || p4 == 0 || po == 0 ||
       dc_dm == 0))
    throw std::invalid_argument("pre, w_hh_t, h0, c0, h, c, p4, po and dc_dm must not be null");
  p.steps = steps;
  p.batch = batch;
  p.hidden = hidden;
  p.pre = reinterpret_cast<void*>(pre);
  p.w_hh_t = reinterpret_cast<const void*>(w_hh_t);
  p.h0 = reinterpret_cast<const void*>(h0);
  p.c0 = reinterpret_cast<const void*>(c0);
  p.h = reinterpret_cast<void*>(h);
  p.c = reinterpret_cast<void*>(c);
  p.p4 = reinterpret_cast<void*>(p4);
  p.po = reinterpret_cast<void*>(po);
  p.dc_dm = reinterpret_cast<void*>(dc_dm);
  py::gil_scoped_release release;
  cpu::lstm_forward(p);
}

void lstm_bptt(int dtype, int64_t steps, int64_t batch, int64_t hidden, uintptr_t gh, uintptr_t p4,
               uintptr_t po, uintptr_t dc_dm, uintptr_t w_hh, uintptr_t gcn, uintptr_t buf,
               uintptr_t dh0, uintptr_t dc0) {
  LstmBpttProblem p;
  p.dtype = lstm_dtype(dtype);
  check_lstm_sizes(steps, batch, hidden);
  if (batch * hidden > 0 && (dh0 == 0 || dc0 == 0 || w_hh == 0))
    throw std::invalid_argument("dh0, dc0 and w_hh must not be null");
  if (steps * batch * hidden > 0 && (gh == 0 || p4 == 0 || po == 0 || dc_dm == 0 || buf == 0))
    throw std::invalid_argument("gh, p4, po, dc_dm and buf must not be null");
  p.steps = steps;
  p.batch = batch;
  p.hidden = hidden;
  p.gh = reinterpret_cast<const void*>(gh);
  p.p4 = reinterpret_cast<const void*>(p4);
  p.po = reinterpret_cast<const void*>(po);
  p.dc_dm = reinterpret_cast<const void*>(dc_dm);
  p.w_hh = reinterpret_cast<const void*>(w_hh);
  p.gcn = reinterpret_cast<const void*>(gcn);
  p.buf = reinterpret_cast<void*>(buf);
  p.dh0 = reinterpret_cast<void*>(dh0);
  p.dc0 = reinterpret_cast<void*>(dc0);
  py::gil_scoped_release release;
  cpu::lstm_bptt(p);
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  // A PPML_FAST_CPU_ISA that names no instruction set is ignored, with a warning at import.
  if (const char* problem = cpu::isa_env_problem(); problem[0] != '\0') {
    if (PyErr_WarnEx(PyExc_RuntimeWarning, problem, 1) != 0) throw py::error_already_set();
  }
  m.def("_cpu_isa", [] { return std::string(cpu::isa_name(cpu::isa_limit())); },
        "The highest instruction set the CPU kernels use now: 'avx512', 'avx2' or 'portable' "
        "(the CPU's best, lowered by PPML_FAST_CPU_ISA or _set_cpu_isa).");
  m.def("_cpu_isa_available", [] { return std::string(cpu::isa_name(cpu::cpu_isa())); },
        "The best instruction set of this CPU that the kernels have builds for.");
  m.def("_set_cpu_isa", [](const std::string& name) {
    cpu::Isa isa;
    bool automatic;
    if (!cpu::parse_isa(name.c_str(), &isa, &automatic))
      throw std::invalid_argument("isa must be one of 'auto', 'avx512', 'avx2', 'portable'; got '" +
                                  name + "'");
    return std::string(cpu::isa_name(cpu::set_isa_limit(automatic ? cpu::cpu_isa() : isa)));
  }, py::arg("isa"),
        "Switch (also for the tests): the highest instruction set of the CPU kernels, capped by "
        "the CPU ('auto' = the CPU's best); returns the previous one. Every set gives the same bits.");
  m.doc() = "ppml_fast native kernels on raw buffers (see ppml_fast.ops for the public API)";
  m.attr("CHUNK") = py::int_(kChunk);
  m.def("cuda_available", &cuda::available, "True when this build includes the CUDA kernels");
  m.def("clip_accumulate", &clip_accumulate, py::arg("device"), py::arg("stream"),
        py::arg("dtype"), py::arg("rows"), py::arg("seg_ptrs"), py::arg("seg_widths"),
        py::arg("row_ptrs"), py::arg("out_ptrs"), py::arg("norms"), py::arg("row_scale"),
        py::arg("mode"), py::arg("per_layer"), py::arg("max_norms"), py::arg("eps"),
        py::arg("gamma"), py::arg("scratch"), py::arg("num_threads"));
  m.def("gaussian_noise", &gaussian_noise, py::arg("device"), py::arg("stream"), py::arg("ptrs"),
        py::arg("numels"), py::arg("dtypes"), py::arg("stddev"), py::arg("denominator"),
        py::arg("divide"), py::arg("secure"), py::arg("seed"), py::arg("offset"),
        py::arg("key_words"), py::arg("num_threads"), py::arg("name") = "tensors");
  m.def("lstm_cells", &lstm_cells, py::arg("dtype"), py::arg("steps"), py::arg("batch"),
        py::arg("hidden"), py::arg("ig"), py::arg("f"), py::arg("f_row"), py::arg("c0"), py::arg("c"),
        "LSTM cell states c_t = ig_t + f_t c_{t-1} (CPU, float32/float64, raw buffers)");
  m.def("embedding_norms", &embedding_norms, py::arg("dtype"), py::arg("batch"), py::arg("seq"),
        py::arg("dim"), py::arg("idx"), py::arg("g"), py::arg("pad"), py::arg("sq"),
        py::arg("norm_sum"), py::arg("num_threads"),
        "Per-record squared norms of an embedding's gradient rows, float64 (CPU)");
  m.def("lstm_forward", &lstm_forward, py::arg("dtype"), py::arg("steps"), py::arg("batch"),
        py::arg("hidden"), py::arg("pre"), py::arg("w_hh_t"), py::arg("h0"), py::arg("c0"),
        py::arg("h"), py::arg("c"), py::arg("p4"), py::arg("po"), py::arg("dc_dm"),
        "Forward of one LSTM direction keeping its backward's factors (CPU)");
  m.def("lstm_bptt", &lstm_bptt, py::arg("dtype"), py::arg("steps"), py::arg("batch"),
        py::arg("hidden"), py::arg("gh"), py::arg("p4"), py::arg("po"), py::arg("dc_dm"),
        py::arg("w_hh"), py::arg("gcn"), py::arg("buf"), py::arg("dh0"), py::arg("dc0"),
        "Backpropagation through time of one LSTM direction writing its gate gradients (CPU)");
  m.def("secagg_mask", &secagg_mask, py::arg("device"), py::arg("stream"), py::arg("x"),
        py::arg("n"), py::arg("seeds"), py::arg("signs"), py::arg("num_seeds"),
        py::arg("num_threads"));
  m.def("_set_clip_simd", &cpu::set_clip_simd, py::arg("enabled"),
        "Test hook: AVX2 (True) or portable (False) build of the CPU clipping / aggregation "
        "loops; returns the previous setting. Both give the same bits.");
  m.def("_set_clip_avx512", &cpu::set_clip_avx512, py::arg("enabled"),
        "Switch: the AVX-512 build of the CPU clipping / aggregation loops where the instruction "
        "set allows it (on by default; PPML_FAST_CLIP_AVX512=0 starts it off); "
        "returns the previous setting. All builds give the same bits.");
  m.def("_set_clip_f16c", &cpu::set_clip_f16c, py::arg("enabled"),
        "Test hook: within the AVX2 build, F16C (True) or plain AVX2 (False) float16 clipping / "
        "aggregation loops; returns the previous setting. All give the same bits.");
  m.def("_set_secagg_simd", &cpu::set_secagg_simd, py::arg("enabled"),
        "Test hook: AVX2 (True) or portable (False) CPU mask path; returns the previous setting.");
  // Known-answer hooks for the tests: the raw generators and one Box-Muller pair.
  m.def("philox4x32_10", [](std::vector<uint32_t> ctr, std::vector<uint32_t> key) {
    if (ctr.size() != 4 || key.size() != 2) throw std::invalid_argument("ctr[4], key[2]");
    uint32_t out[4];
    Philox4x32::block(ctr[0], ctr[1], ctr[2], ctr[3], key[0], key[1], out);
    return std::vector<uint32_t>(out, out + 4);
  });
  m.def("chacha20_block", [](std::vector<uint32_t> key, std::vector<uint32_t> nonce,
                             uint32_t counter) {
    if (key.size() != 8 || nonce.size() != 3) throw std::invalid_argument("key[8], nonce[3]");
    ChaCha20Key k;
    for (int i = 0; i < 8; ++i) k.key[i] = key[i];
    for (int i = 0; i < 3; ++i) k.nonce[i] = nonce[i];
    uint32_t out[16];
    chacha20_block(k, counter, out);
    return std::vector<uint32_t>(out, out + 16);
  });
  m.def("log_positive", &log_positive);
  m.def("_set_noise_simd", &cpu::set_noise_simd, py::arg("enabled"),
        "Test hook: AVX2 (True) or portable (False) CPU noise path; returns the previous "
        "setting. Both give the same bits.");
  m.def("_set_noise_f16c", &cpu::set_noise_f16c, py::arg("enabled"),
        "Test hook: within the AVX2 noise path, F16C (True) or element-by-element (False) "
        "float16 updates; returns the previous setting. Both give the same bits.");
  m.def("sincos_turns", [](double a) {
    double s, c;
    sincos_turns(a, &s, &c);
    return py::make_tuple(s, c);
  });
}
