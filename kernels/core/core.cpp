// lmcor._core: the host work of every decode step, compiled. Each function and class here has a
// plain Python reference that computes the same values (named in each header); tests/test_core.py
// compares them exactly. Buffers are NumPy arrays read and written in place; the loops run without
// the GIL.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cstring>
#include <stdexcept>
#include <string>
#include <vector>

#include "chrf.hpp"
#include "drafts.hpp"
#include "spans.hpp"
#include "step.hpp"
#include "vote.hpp"

#if defined(__SSE__) || defined(_M_X64)
#include <xmmintrin.h>
// MXCSR's flush-to-zero (bit 15) and denormals-are-zero (bit 6).
constexpr unsigned kFlushDenormals = 0x8040;
unsigned fp_mode() { return _mm_getcsr(); }
void set_fp_mode(unsigned mode) { _mm_setcsr(mode); }
#else
constexpr unsigned kFlushDenormals = 0;  // no such mode here: both calls do nothing
unsigned fp_mode() { return 0; }
void set_fp_mode(unsigned) {}
#endif

#ifndef LMCOR_CORE_SOURCES
#define LMCOR_CORE_SOURCES "unknown"
#endif

namespace py = pybind11;
using lmcor::CharGrams;

namespace {

using Int64Array = py::array_t<int64_t, py::array::c_style>;
using FloatArray = py::array_t<float, py::array::c_style>;

// The code points of `text` with whitespace removed, as `"".join(text.split())` leaves them.
void squeezed(PyObject* text, std::vector<uint32_t>& out) {
  out.clear();
  if (!PyUnicode_Check(text)) throw py::type_error("chrF compares str, got " + std::string(Py_TYPE(text)->tp_name));
  const int kind = PyUnicode_KIND(text);
  const void* data = PyUnicode_DATA(text);
  const Py_ssize_t length = PyUnicode_GET_LENGTH(text);
  out.reserve(static_cast<size_t>(length));
  for (Py_ssize_t i = 0; i < length; ++i) {
    Py_UCS4 c = PyUnicode_READ(kind, data, i);
    if (!Py_UNICODE_ISSPACE(c)) out.push_back(static_cast<uint32_t>(c));
  }
}

struct ChrfScratch {
  std::vector<uint32_t> chars;
  CharGrams hyp, ref;
};

ChrfScratch& chrf_scratch() {
  thread_local ChrfScratch scratch;
  return scratch;
}

double chrf_text(py::str hypothesis, py::str reference) {
  ChrfScratch& s = chrf_scratch();
  squeezed(hypothesis.ptr(), s.chars);
  s.hyp.build(s.chars.data(), s.chars.size());
  squeezed(reference.ptr(), s.chars);
  s.ref.build(s.chars.data(), s.chars.size());
  return lmcor::chrf(s.hyp, s.ref);
}

// Every candidate's chrF against `text`: (the first best's index, its score). The caller handles an
// exact match and an empty list.
py::tuple nearest(py::str text, py::sequence candidates) {
  ChrfScratch& s = chrf_scratch();
  const size_t count = py::len(candidates);
  if (!count) throw py::value_error("nearest: no candidates");
  std::vector<std::vector<uint32_t>> texts(count);
  for (size_t i = 0; i < count; ++i) squeezed(py::object(candidates[i]).ptr(), texts[i]);
  squeezed(text.ptr(), s.chars);
  size_t best = 0;
  double top = 0.0;
  {
    py::gil_scoped_release unlocked;
    s.hyp.build(s.chars.data(), s.chars.size());
    for (size_t i = 0; i < count; ++i) {
      s.ref.build(texts[i].data(), texts[i].size());
      double score = lmcor::chrf(s.hyp, s.ref);
      if (i == 0 || score > top) {
        top = score;
        best = i;
      }
    }
  }
  return py::make_tuple(best, top);
}

std::vector<int64_t> tokens_of(py::handle sequence) {
  auto array = py::array_t<int64_t, py::array::c_style | py::array::forcecast>::ensure(sequence);
  if (!array) throw py::type_error("expected a sequence of token ids");
  if (array.ndim() != 1) throw py::value_error("expected a 1-d sequence of token ids");
  const int64_t* data = array.data();
  return std::vector<int64_t>(data, data + array.size());
}

struct DecodeScratch {
  std::vector<int64_t> banned;
  std::vector<uint8_t> mask;
  std::vector<const lmcor::RepeatBan*> bans;
};

// `decode.accept`'s choices for rows whose bans are all native (or None). Writes, per row, the
// accepted draft tokens to `accepted` and the model's next token to `next` (done rows: 0 and -1).
// Returns False, having written nothing, where a row's ban is not native: the caller runs the reference.
bool accept(FloatArray logits, Int64Array ids, Int64Array drafted, Int64Array written, Int64Array least,
            Int64Array most, py::array_t<bool, py::array::c_style> done, py::sequence bans, int64_t eos,
            int64_t forced_bos, int64_t forced_eos, Int64Array accepted, Int64Array next) {
  if (logits.ndim() != 3 || ids.ndim() != 2) throw py::value_error("accept: logits (rows, n, vocab), ids (rows, n)");
  const int64_t rows = logits.shape(0), positions = logits.shape(1), vocab = logits.shape(2);
  if (ids.shape(0) != rows || ids.shape(1) != positions)
    throw py::value_error("accept: ids must be (rows, n) as the logits are");
  if (vocab < 1) throw py::value_error("accept: logits over an empty vocabulary");
  if (!accepted.writeable() || !next.writeable()) throw py::value_error("accept: accepted and next must be writeable");
  for (const auto* a : {&drafted, &written, &least, &most, &accepted, &next})
    if (a->ndim() != 1 || a->shape(0) != rows) throw py::value_error("accept: per-row arrays must hold one value a row");
  if (done.ndim() != 1 || done.shape(0) != rows || static_cast<int64_t>(py::len(bans)) != rows)
    throw py::value_error("accept: done and bans must hold one value a row");
  thread_local DecodeScratch scratch;
  scratch.bans.assign(static_cast<size_t>(rows), nullptr);
  for (int64_t r = 0; r < rows; ++r) {
    py::object ban = bans[r];
    if (ban.is_none()) continue;
    if (!py::isinstance<lmcor::RepeatBan>(ban)) return false;
    scratch.bans[r] = ban.cast<const lmcor::RepeatBan*>();
  }
  for (int64_t r = 0; r < rows; ++r)
    if (drafted.data()[r] < 0 || drafted.data()[r] >= positions) throw py::value_error("accept: draft longer than the ids");
  if (scratch.mask.size() < static_cast<size_t>(vocab)) scratch.mask.assign(static_cast<size_t>(vocab), 0);
  const lmcor::Specials sp{eos, forced_bos, forced_eos};
  const float* scores = logits.data();
  const int64_t* fed = ids.data();
  int64_t* out_accepted = accepted.mutable_data();
  int64_t* out_next = next.mutable_data();
  py::gil_scoped_release unlocked;
  for (int64_t r = 0; r < rows; ++r) {
    if (done.data()[r]) {
      out_accepted[r] = 0;
      out_next[r] = -1;
      continue;
    }
    out_accepted[r] = lmcor::accept_row(scores + r * positions * vocab, positions, vocab, fed + r * positions + 1,
                                        drafted.data()[r], written.data()[r], least.data()[r], most.data()[r], sp,
                                        scratch.bans[r], out_next[r], scratch.banned, scratch.mask);
  }
  return true;
}

// `RaggedDecoder.step`'s writes: each row's new keys/values (`presents`, (rows, heads, new, dim))
// into its slots of `caches` ((slots, heads, room, dim)) after its `lengths` cached tokens, rows
// counted from `first`.
void write_rows(py::sequence caches, py::sequence presents, Int64Array lengths, int64_t first) {
  const size_t layers = py::len(caches);
  if (py::len(presents) != layers) throw py::value_error("write_rows: one present per cache");
  std::vector<float*> to(layers);
  std::vector<const float*> from(layers);
  std::vector<py::array_t<float, py::array::c_style | py::array::forcecast>> read(layers);  // copies live to the end
  int64_t rows = lengths.shape(0), heads = 0, room = 0, dim = 0, fresh = 0;
  if (first < 0) throw py::value_error("write_rows: first must be a row of the caches (0 or more)");
  for (size_t i = 0; i < layers; ++i) {
    // The caches are written: they must be float32 C arrays as they are (`ensure` would write a converted copy).
    if (!py::isinstance<FloatArray>(caches[i]))
      throw py::value_error("write_rows: caches must be C-contiguous float32 arrays");
    auto cache = py::reinterpret_borrow<FloatArray>(caches[i]);
    // The presents are only read: any float array is taken, as a C-contiguous float32 copy where it is not one.
    auto& present = read[i] = py::array_t<float, py::array::c_style | py::array::forcecast>::ensure(presents[i]);
    if (!present || !cache.writeable() || cache.ndim() != 4 || present.ndim() != 4)
      throw py::value_error("write_rows: caches and presents must be 4-d float32 arrays, the caches C-contiguous");
    if (i == 0) {
      heads = cache.shape(1), room = cache.shape(2), dim = cache.shape(3), fresh = present.shape(2);
    }
    if (cache.shape(1) != heads || cache.shape(2) != room || cache.shape(3) != dim || present.shape(0) != rows ||
        present.shape(1) != heads || present.shape(2) != fresh || present.shape(3) != dim ||
        first + rows > cache.shape(0))
      throw py::value_error("write_rows: shapes disagree");
    to[i] = cache.mutable_data();
    from[i] = present.data();
  }
  const int64_t* at = lengths.data();
  for (int64_t r = 0; r < rows; ++r)
    if (at[r] < 0 || at[r] + fresh > room) throw py::value_error("write_rows: no room after a row's cached tokens");
  py::gil_scoped_release unlocked;
  const size_t span = static_cast<size_t>(fresh * dim) * sizeof(float);
  for (size_t i = 0; i < layers; ++i)
    for (int64_t r = 0; r < rows; ++r)
      for (int64_t h = 0; h < heads; ++h)
        std::memcpy(to[i] + (((first + r) * heads + h) * room + at[r]) * dim, from[i] + ((r * heads + h) * fresh) * dim,
                    span);
}

}  // namespace

PYBIND11_MODULE(_core, m) {
  m.doc() = "lmcor's compiled core: the host work of each decode step (see lmcor.runtime.core)";
  m.attr("SOURCES") = LMCOR_CORE_SOURCES;  // sha256 of kernels/core's sources (setup.py)
  m.attr("FLUSH_DENORMALS") = kFlushDenormals;
  m.def("fp_mode", &fp_mode, "This thread's floating-point control word (x86: MXCSR; elsewhere 0).");
  m.def("set_fp_mode", &set_fp_mode, py::arg("mode"), "Set this thread's floating-point control word.");

  m.def("chrf", &chrf_text, py::arg("hypothesis"), py::arg("reference"),
        "Sentence chrF (0-100) of two texts, as fallback.chrf(char_ngrams(h), char_ngrams(r)).");
  m.def("nearest", &nearest, py::arg("text"), py::arg("candidates"),
        "(index, chrF) of the first candidate most similar to text; no exact-match shortcut.");

  py::class_<lmcor::Drafts>(m, "Drafts", "One row's draft proposals (drafts.Drafts' reference).")
      .def(py::init([](py::iterable references, int64_t end, int max_ngram) {
             std::vector<std::vector<int64_t>> refs;
             for (py::handle seq : references) refs.push_back(tokens_of(seq));
             return new lmcor::Drafts(refs, end, max_ngram);
           }),
           py::arg("references"), py::arg("end"), py::arg("max_ngram"))
      .def_readwrite("size", &lmcor::Drafts::size)
      .def_readonly("max_ngram", &lmcor::Drafts::max_ngram)
      .def(
          "propose",
          [](lmcor::Drafts& self, const std::vector<int64_t>& history, int64_t limit) {
            thread_local std::vector<int64_t> out;
            self.propose(history.data(), history.size(), limit, out);
            return out;
          },
          py::arg("history"), py::arg("limit"))
      .def("update", &lmcor::Drafts::update, py::arg("drafted"), py::arg("accepted"));

  py::class_<lmcor::RepeatBan>(m, "RepeatBan", "no_repeat_ngram_size over one sequence (sequence.RepeatBan's reference).")
      .def(py::init<int64_t, int64_t>(), py::arg("size"), py::arg("start"))
      .def_readonly("size", &lmcor::RepeatBan::size)
      .def_readonly("seq", &lmcor::RepeatBan::seq)
      .def(
          "banned",
          [](const lmcor::RepeatBan& self, const std::vector<int64_t>& extra) {
            std::vector<int64_t> out;
            self.banned(extra.data(), extra.size(), out);
            return out;
          },
          py::arg("extra") = std::vector<int64_t>())
      .def(
          "extend", [](lmcor::RepeatBan& self, const std::vector<int64_t>& tokens) { self.extend(tokens.data(), tokens.size()); },
          py::arg("tokens"));

  m.def("accept", &accept, py::arg("logits"), py::arg("ids"), py::arg("drafted"), py::arg("written"), py::arg("least"),
        py::arg("most"), py::arg("done"), py::arg("bans"), py::arg("eos"), py::arg("forced_bos"), py::arg("forced_eos"),
        py::arg("accepted").noconvert(), py::arg("next").noconvert());  // written: never a converted copy
  m.def("edit_vote", &lmcor::edit_vote, py::arg("source"), py::arg("candidates"), py::arg("need"),
        "The source's word ids with every edit that at least `need` candidates make (vote.edit_vote's reference); "
        "ids must number the words in their sorted order.");
  m.def("opcodes", &lmcor::opcodes, py::arg("a"), py::arg("b"),
        "difflib.SequenceMatcher(None, a, b, autojunk=False).get_opcodes() of two sequences of word ids.");
  m.def("matched", &lmcor::matched, py::arg("a"), py::arg("b"),
        "The elements difflib.SequenceMatcher(None, a, b, autojunk=False) matches (ratio: 2 * matched / total).");
  m.def("write_rows", &write_rows, py::arg("caches"), py::arg("presents"), py::arg("lengths"), py::arg("first"));
  m.def(
      "tokens_in",
      [](const lmcor::Offsets& offsets, const std::vector<int64_t>& special, const lmcor::Offsets& spans) {
        if (special.size() != offsets.size()) throw py::value_error("tokens_in: one special-token flag per offset");
        py::list out;
        for (const auto& tokens : lmcor::tokens_in(offsets, special, spans))
          out.append(Int64Array(static_cast<py::ssize_t>(tokens.size()), tokens.data()));
        return out;
      },
      py::arg("offsets"), py::arg("special"), py::arg("spans"),
      "For each character span, the indices of the encoding's tokens in it (tokens._tokens_in's reference).");
}
