// Draft proposals copied from a row's reference sequences. Reference: runtime/drafts.py (`Drafts`,
// `_vote`): the same index, the same longest-match-first lookup, the same weighted vote with the
// earliest match winning ties, so that both propose the same tokens.
#pragma once

#include <algorithm>
#include <cstdint>
#include <map>
#include <unordered_map>
#include <utility>
#include <vector>

namespace lmcor {

constexpr int64_t kMaxDraft = 32, kFirstDraft = 24;

class Drafts {
 public:
  using Position = std::pair<int32_t, int32_t>;  // (reference sequence, index after the match)

  // `references`: the row's sequences, without `end`; each distinct one is indexed once and votes
  // with the number of times it occurs (in order of first occurrence, as `collections.Counter`).
  Drafts(const std::vector<std::vector<int64_t>>& references, int64_t end, int max_ngram)
      : max_ngram(max_ngram) {
    std::map<std::vector<int64_t>, size_t> seen;
    for (const auto& ref : references) {
      std::vector<int64_t> seq(ref);
      seq.push_back(end);
      auto found = seen.find(seq);
      if (found != seen.end()) {
        ++weights_[found->second];
        continue;
      }
      seen.emplace(seq, refs_.size());
      refs_.push_back(std::move(seq));
      weights_.push_back(1);
    }
    for (size_t s = 0; s < refs_.size(); ++s)
      for (size_t p = 1; p < refs_[s].size(); ++p)
        table_[refs_[s][p - 1]].emplace_back(static_cast<int32_t>(s), static_cast<int32_t>(p));
  }

  // Up to min(limit, size) tokens likely to follow `history` (only its last max_ngram tokens, and
  // whether it is empty, matter), written to `out`.
  void propose(const int64_t* history, size_t length, int64_t limit, std::vector<int64_t>& out) {
    out.clear();
    int64_t want = std::min(limit, size);
    if (want <= 0) return;
    starts_.clear();
    if (!length) {
      for (size_t s = 0; s < refs_.size(); ++s) starts_.emplace_back(static_cast<int32_t>(s), 0);
      vote(want, out);
      return;
    }
    auto after_last = table_.find(history[length - 1]);
    if (after_last == table_.end()) return;
    size_t top = std::min<size_t>(static_cast<size_t>(std::max(max_ngram, 0)), length);
    for (size_t n = top; n > 0; --n) {
      const int64_t* tail = history + length - n;
      for (const Position& at : after_last->second) {
        if (static_cast<size_t>(at.second) < n) continue;
        const int64_t* before = refs_[at.first].data() + at.second - n;
        if (std::equal(tail, tail + n, before)) starts_.push_back(at);
      }
      if (!starts_.empty()) {
        vote(want, out);
        return;
      }
    }
  }

  // Grow while drafts are accepted whole, shrink to a little more than was accepted, halve while
  // nothing is.
  void update(int64_t drafted, int64_t accepted) {
    if (drafted == 0) return;
    if (accepted == drafted) size = std::min(kMaxDraft, std::min(kMaxDraft, size) + 4);  // a size set past it: no overflow
    else if (accepted) size = accepted + 2;
    else size = std::max<int64_t>(1, size / 2);
  }

  int max_ngram;
  int64_t size = kFirstDraft;

 private:
  // Follow the majority continuation of `starts_` for up to `want` tokens.
  void vote(int64_t want, std::vector<int64_t>& out) {
    alive_.swap(starts_);
    for (int64_t k = 0; k < want; ++k) {
      if (alive_.size() == 1) {  // one match left: its continuation is the draft
        const std::vector<int64_t>& ref = refs_[alive_[0].first];
        size_t from = std::min(ref.size(), static_cast<size_t>(alive_[0].second + k));
        size_t to = std::min(ref.size(), static_cast<size_t>(alive_[0].second + want));
        out.insert(out.end(), ref.begin() + from, ref.begin() + std::max(from, to));
        return;
      }
      votes_.clear();  // (token, votes) in order of first appearance
      for (const Position& at : alive_) {
        const std::vector<int64_t>& ref = refs_[at.first];
        size_t p = static_cast<size_t>(at.second + k);
        if (p >= ref.size()) continue;
        auto v = std::find_if(votes_.begin(), votes_.end(), [&](const auto& e) { return e.first == ref[p]; });
        if (v == votes_.end()) votes_.emplace_back(ref[p], weights_[at.first]);
        else v->second += weights_[at.first];
      }
      if (votes_.empty()) break;
      auto best = votes_.begin();  // the first of equals
      for (auto v = votes_.begin() + 1; v != votes_.end(); ++v)
        if (v->second > best->second) best = v;
      int64_t token = best->first;
      out.push_back(token);
      next_.clear();
      for (const Position& at : alive_) {
        const std::vector<int64_t>& ref = refs_[at.first];
        size_t p = static_cast<size_t>(at.second + k);
        if (p < ref.size() && ref[p] == token) next_.push_back(at);
      }
      alive_.swap(next_);
    }
  }

  std::vector<std::vector<int64_t>> refs_;
  std::vector<int64_t> weights_;
  std::unordered_map<int64_t, std::vector<Position>> table_;
  std::vector<Position> starts_, alive_, next_;
  std::vector<std::pair<int64_t, int64_t>> votes_;
};

}  // namespace lmcor
