#include "tokenizer.hpp"

#include <algorithm>
#include <queue>
#include <stdexcept>

#include "unicode.hpp"

namespace kvpack::llama {
namespace {

// GPT-2's byte-to-unicode alphabet: printable Latin-1 bytes stand for themselves, the other 68
// bytes are moved to U+0100.. in byte order, so every byte is one visible vocabulary character.
uint32_t byte_to_codepoint(int b) {
  const bool printable = (b >= 0x21 && b <= 0x7E) || (b >= 0xA1 && b <= 0xAC) || (b >= 0xAE);
  if (printable) return static_cast<uint32_t>(b);
  int index = 0;  // rank of b among the non-printable bytes
  for (int c = 0; c < b; ++c) {
    const bool p = (c >= 0x21 && c <= 0x7E) || (c >= 0xA1 && c <= 0xAC) || (c >= 0xAE);
    if (!p) ++index;
  }
  return 0x100u + static_cast<uint32_t>(index);
}

// Cuts one run of characters (no special tokens, no forced digit splits) by the GPT-2 pattern
//   's|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+
// The alternatives are tried in order at each position, as the regex engine would.
void split_gpt2(const std::vector<Utf8Char>& c, size_t begin, size_t end,
                std::vector<std::pair<size_t, size_t>>& words) {
  auto cp = [&](size_t i) { return c[i].codepoint; };
  auto is_other = [&](size_t i) {
    return !is_whitespace(cp(i)) && !is_letter(cp(i)) && !is_number(cp(i));
  };
  size_t i = begin;
  while (i < end) {
    size_t j = i;
    // Contractions (case-sensitive, as in the pattern).
    if (cp(i) == '\'' && i + 1 < end) {
      const uint32_t a = cp(i + 1);
      if (a == 's' || a == 't' || a == 'm' || a == 'd') {
        j = i + 2;
      } else if (i + 2 < end) {
        const uint32_t b = cp(i + 2);
        if ((a == 'r' && b == 'e') || (a == 'v' && b == 'e') || (a == 'l' && b == 'l')) j = i + 3;
      }
    }
    if (j == i) {
      // Optional leading space, then a run of one class.
      const size_t k = (cp(i) == ' ' && i + 1 < end) ? i + 1 : i;
      if (is_letter(cp(k))) {
        j = k + 1;
        while (j < end && is_letter(cp(j))) ++j;
      } else if (is_number(cp(k))) {
        j = k + 1;
        while (j < end && is_number(cp(j))) ++j;
      } else if (is_other(k)) {
        j = k + 1;
        while (j < end && is_other(j)) ++j;
      }
    }
    if (j == i) {
      // White space: the whole run if it reaches the end or is one character; otherwise all but
      // its last character, which then leads the next word.
      size_t e = i + 1;
      while (e < end && is_whitespace(cp(e))) ++e;
      j = (e == end || e - i == 1) ? e : e - 1;
    }
    words.emplace_back(i, j);
    i = j;
  }
}

}  // namespace

Tokenizer::Tokenizer(std::vector<std::string> tokens, const std::vector<std::string>& merges,
                     std::vector<int32_t> kinds, PreTokenizer pre, int32_t bos_id, int32_t eos_id,
                     int32_t unknown_id)
    : tokens_(std::move(tokens)),
      kinds_(std::move(kinds)),
      pre_(pre),
      bos_id_(bos_id),
      eos_id_(eos_id),
      unknown_id_(unknown_id) {
  if (tokens_.empty()) throw std::invalid_argument("tokenizer: empty vocabulary");
  if (tokens_.size() > static_cast<size_t>(INT32_MAX)) {
    throw std::invalid_argument("tokenizer: vocabulary too large");
  }
  if (kinds_.empty()) kinds_.assign(tokens_.size(), static_cast<int32_t>(TokenKind::kNormal));
  if (kinds_.size() != tokens_.size()) {
    throw std::invalid_argument("tokenizer: " + std::to_string(kinds_.size()) +
                                " token kinds for " + std::to_string(tokens_.size()) + " tokens");
  }
  const int32_t n = static_cast<int32_t>(tokens_.size());
  for (auto [name, id] : {std::pair<const char*, int32_t>{"bos", bos_id_},
                          {"eos", eos_id_},
                          {"unknown", unknown_id_}}) {
    if (id < -1 || id >= n) {
      throw std::invalid_argument(std::string("tokenizer: ") + name + " token id " +
                                  std::to_string(id) + " outside the vocabulary of " +
                                  std::to_string(n));
    }
  }
  token_ids_.reserve(tokens_.size());
  for (int32_t id = 0; id < n; ++id) {
    token_ids_.emplace(tokens_[id], id);  // first id wins for duplicate strings
    const TokenKind k = static_cast<TokenKind>(kinds_[id]);
    if ((k == TokenKind::kControl || k == TokenKind::kUserDefined) && !tokens_[id].empty()) {
      special_ids_.push_back(id);
    }
  }
  // Longest first, so that a special token that is a prefix of another never wins.
  std::stable_sort(special_ids_.begin(), special_ids_.end(),
                   [&](int32_t a, int32_t b) { return tokens_[a].size() > tokens_[b].size(); });

  merge_ranks_.reserve(merges.size());
  for (size_t r = 0; r < merges.size(); ++r) {
    const std::string& m = merges[r];
    const size_t space = m.find(' ');
    if (space == std::string::npos || space == 0 || space + 1 >= m.size() ||
        m.find(' ', space + 1) != std::string::npos) {
      throw std::invalid_argument("tokenizer: merge #" + std::to_string(r) + " '" + m +
                                  "' is not of the form 'left right'");
    }
    merge_ranks_.emplace(m, static_cast<int>(r));  // first (highest priority) wins
  }

  for (int b = 0; b < 256; ++b) {
    const uint32_t cp = byte_to_codepoint(b);
    append_utf8(cp, byte_symbols_[b]);
    symbol_bytes_.emplace(cp, static_cast<uint8_t>(b));
  }
}

Tokenizer Tokenizer::from_gguf(const GgufFile& file) {
  const std::string& model = file.get_string("tokenizer.ggml.model");
  if (model != "gpt2") {
    throw GgufError("tokenizer.ggml.model is '" + model +
                    "'; only 'gpt2' (byte-level BPE) is "
                    "supported");
  }
  PreTokenizer pre = PreTokenizer::kGpt2;
  if (file.has("tokenizer.ggml.pre")) {
    const std::string& name = file.get_string("tokenizer.ggml.pre");
    if (name == "smollm" || name == "starcoder" || name == "refact" || name == "codeshell") {
      pre = PreTokenizer::kGpt2SplitDigits;
    } else if (name != "gpt2" && name != "default") {
      throw GgufError("tokenizer.ggml.pre '" + name +
                      "' is not supported (smollm, starcoder, "
                      "refact, codeshell, gpt2 and default are)");
    }
  }
  std::vector<int32_t> kinds;
  if (file.has("tokenizer.ggml.token_type")) {
    for (int64_t k : file.get_int_array("tokenizer.ggml.token_type")) {
      kinds.push_back(static_cast<int32_t>(k));
    }
  }
  auto id_or_none = [&](const char* key) -> int32_t {
    if (!file.has(key)) return -1;
    const int64_t v = file.get_int(key);
    if (v < -1 || v > INT32_MAX) throw GgufError(std::string(key) + " is out of range");
    return static_cast<int32_t>(v);
  };
  try {
    return Tokenizer(file.get_string_array("tokenizer.ggml.tokens"),
                     file.get_string_array("tokenizer.ggml.merges"), std::move(kinds), pre,
                     id_or_none("tokenizer.ggml.bos_token_id"),
                     id_or_none("tokenizer.ggml.eos_token_id"),
                     id_or_none("tokenizer.ggml.unknown_token_id"));
  } catch (const std::invalid_argument& e) {
    throw GgufError(e.what());
  }
}

void Tokenizer::check_id(int32_t id) const {
  if (id < 0 || id >= vocab_size()) {
    throw std::out_of_range("tokenizer: token id " + std::to_string(id) + " outside [0, " +
                            std::to_string(vocab_size()) + ")");
  }
}

TokenKind Tokenizer::kind(int32_t id) const {
  check_id(id);
  return static_cast<TokenKind>(kinds_[id]);
}

const std::string& Tokenizer::token_piece(int32_t id) const {
  check_id(id);
  return tokens_[id];
}

int32_t Tokenizer::find_piece(const std::string& piece) const {
  auto it = token_ids_.find(piece);
  return it == token_ids_.end() ? -1 : it->second;
}

int Tokenizer::merge_rank(std::string_view left, std::string_view right) const {
  std::string key;
  key.reserve(left.size() + right.size() + 1);
  key.append(left).push_back(' ');
  key.append(right);
  auto it = merge_ranks_.find(key);
  return it == merge_ranks_.end() ? -1 : it->second;
}

std::vector<std::string> Tokenizer::pre_tokenize(std::string_view text) const {
  const std::vector<Utf8Char> chars = decode_utf8(text);
  std::vector<std::pair<size_t, size_t>> words;  // character index ranges
  if (pre_ == PreTokenizer::kGpt2SplitDigits) {
    // Digits stand alone; the stretches between them go through the GPT-2 pattern.
    size_t start = 0;
    for (size_t i = 0; i < chars.size(); ++i) {
      if (is_number(chars[i].codepoint)) {
        split_gpt2(chars, start, i, words);
        words.emplace_back(i, i + 1);
        start = i + 1;
      }
    }
    split_gpt2(chars, start, chars.size(), words);
  } else {
    split_gpt2(chars, 0, chars.size(), words);
  }
  std::vector<std::string> out;
  out.reserve(words.size());
  for (auto [b, e] : words) {
    const size_t from = chars[b].offset;
    const size_t to = chars[e - 1].offset + chars[e - 1].length;
    out.emplace_back(text.substr(from, to - from));
  }
  return out;
}

void Tokenizer::encode_word(std::string_view word, std::vector<int32_t>& out) const {
  // Symbols start as single bytes (in the vocabulary alphabet) and merge by rank: the lowest
  // rank pair first, ties left to right, as GPT-2's BPE does.
  std::string text;
  std::vector<size_t> start, length;
  for (unsigned char b : word) {
    start.push_back(text.size());
    text += byte_symbols_[b];
    length.push_back(byte_symbols_[b].size());
  }
  const int n = static_cast<int>(start.size());
  std::vector<int> prev(n), next(n);
  for (int i = 0; i < n; ++i) {
    prev[i] = i - 1;
    next[i] = i + 1 < n ? i + 1 : -1;
  }
  struct Candidate {
    int rank;
    int left;
    size_t size;  // combined length when queued; a mismatch means the pair went stale
    bool operator>(const Candidate& o) const {
      return rank != o.rank ? rank > o.rank : left > o.left;
    }
  };
  std::priority_queue<Candidate, std::vector<Candidate>, std::greater<Candidate>> queue;
  auto sym = [&](int i) { return std::string_view(text).substr(start[i], length[i]); };
  auto push = [&](int left) {
    if (left < 0 || next[left] < 0) return;
    const int rank = merge_rank(sym(left), sym(next[left]));
    if (rank >= 0) queue.push({rank, left, length[left] + length[next[left]]});
  };
  for (int i = 0; i + 1 < n; ++i) push(i);
  while (!queue.empty()) {
    const Candidate c = queue.top();
    queue.pop();
    const int right = next[c.left];
    if (length[c.left] == 0 || right < 0 || length[c.left] + length[right] != c.size) continue;
    if (merge_rank(sym(c.left), sym(right)) != c.rank) continue;
    length[c.left] += length[right];
    length[right] = 0;
    next[c.left] = next[right];
    if (next[right] >= 0) prev[next[right]] = c.left;
    push(prev[c.left]);
    push(c.left);
  }
  for (int i = 0; i >= 0 && i < n; i = next[i]) {
    const std::string piece(sym(i));
    auto it = token_ids_.find(piece);
    if (it != token_ids_.end()) {
      out.push_back(it->second);
      continue;
    }
    // A symbol missing from the vocabulary (a malformed vocabulary): fall back to its bytes.
    for (size_t at = start[i]; at < start[i] + length[i];) {
      const std::vector<Utf8Char> one = decode_utf8(std::string_view(text).substr(at, 4));
      const std::string single = text.substr(at, one[0].length);
      auto jt = token_ids_.find(single);
      if (jt != token_ids_.end()) {
        out.push_back(jt->second);
      } else if (unknown_id_ >= 0) {
        out.push_back(unknown_id_);
      } else {
        throw std::runtime_error("tokenizer: no token for symbol '" + single + "'");
      }
      at += one[0].length;
    }
  }
}

void Tokenizer::encode_plain(std::string_view text, std::vector<int32_t>& out) const {
  if (text.empty()) return;
  for (const std::string& word : pre_tokenize(text)) encode_word(word, out);
}

std::vector<int32_t> Tokenizer::encode(std::string_view text, bool parse_special) const {
  std::vector<int32_t> out;
  if (!parse_special || special_ids_.empty()) {
    encode_plain(text, out);
    return out;
  }
  size_t plain_start = 0;
  size_t i = 0;
  while (i < text.size()) {
    int32_t found = -1;
    for (int32_t id : special_ids_) {
      const std::string& s = tokens_[id];
      if (text.compare(i, s.size(), s) == 0) {
        found = id;
        break;
      }
    }
    if (found < 0) {
      ++i;
      continue;
    }
    encode_plain(text.substr(plain_start, i - plain_start), out);
    out.push_back(found);
    i += tokens_[found].size();
    plain_start = i;
  }
  encode_plain(text.substr(plain_start), out);
  return out;
}

std::string Tokenizer::token_text(int32_t id, bool render_special) const {
  check_id(id);
  const TokenKind k = static_cast<TokenKind>(kinds_[id]);
  if (k == TokenKind::kControl) return render_special ? tokens_[id] : std::string();
  if (k == TokenKind::kUserDefined) return tokens_[id];
  std::string out;
  for (const Utf8Char& c : decode_utf8(tokens_[id])) {
    auto it =
        c.codepoint == kInvalidCodepoint ? symbol_bytes_.end() : symbol_bytes_.find(c.codepoint);
    if (it != symbol_bytes_.end()) {
      out.push_back(static_cast<char>(it->second));
    } else {
      out.append(tokens_[id], c.offset, c.length);  // outside the alphabet: keep as written
    }
  }
  return out;
}

std::string Tokenizer::decode(const std::vector<int32_t>& ids, bool render_special) const {
  std::string out;
  for (int32_t id : ids) out += token_text(id, render_special);
  return out;
}

std::string apply_chat_template(const std::vector<ChatMessage>& messages,
                                bool add_generation_prompt, const std::string& default_system) {
  std::string out;
  // As the model's template: the default system turn only leads a conversation without one.
  if (!messages.empty() && messages.front().role != "system") {
    out += "<|im_start|>system\n" + default_system + "<|im_end|>\n";
  }
  for (const ChatMessage& m : messages) {
    out += "<|im_start|>" + m.role + "\n" + m.content + "<|im_end|>\n";
  }
  if (add_generation_prompt) out += "<|im_start|>assistant\n";
  return out;
}

}  // namespace kvpack::llama
