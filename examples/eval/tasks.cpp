#include "tasks.hpp"

#include <algorithm>
#include <fstream>
#include <random>
#include <sstream>
#include <stdexcept>

namespace kvpack::eval {
namespace {

/// Minimal parser for a flat JSON object of string values (what the task format needs).
class JsonLine {
 public:
  JsonLine(const std::string& text, int line) : s_(text), line_(line) {}

  std::vector<std::pair<std::string, std::string>> parse() {
    std::vector<std::pair<std::string, std::string>> fields;
    skip_ws();
    expect('{');
    skip_ws();
    if (peek() == '}') return fields;
    for (;;) {
      skip_ws();
      std::string key = string();
      skip_ws();
      expect(':');
      skip_ws();
      fields.emplace_back(key, string());
      skip_ws();
      if (peek() == ',') {
        ++i_;
        continue;
      }
      expect('}');
      skip_ws();
      if (i_ != s_.size()) fail("trailing characters after the object");
      return fields;
    }
  }

 private:
  [[noreturn]] void fail(const std::string& what) const {
    throw std::runtime_error("task file line " + std::to_string(line_) + ", column " +
                             std::to_string(i_ + 1) + ": " + what);
  }
  char peek() const { return i_ < s_.size() ? s_[i_] : '\0'; }
  void skip_ws() {
    while (i_ < s_.size() && (s_[i_] == ' ' || s_[i_] == '\t' || s_[i_] == '\r')) ++i_;
  }
  void expect(char c) {
    if (peek() != c) fail(std::string("expected '") + c + "'");
    ++i_;
  }
  void put_utf8(std::string& out, uint32_t cp) {
    if (cp < 0x80) {
      out += static_cast<char>(cp);
    } else if (cp < 0x800) {
      out += static_cast<char>(0xC0 | (cp >> 6));
      out += static_cast<char>(0x80 | (cp & 0x3F));
    } else if (cp < 0x10000) {
      out += static_cast<char>(0xE0 | (cp >> 12));
      out += static_cast<char>(0x80 | ((cp >> 6) & 0x3F));
      out += static_cast<char>(0x80 | (cp & 0x3F));
    } else {
      out += static_cast<char>(0xF0 | (cp >> 18));
      out += static_cast<char>(0x80 | ((cp >> 12) & 0x3F));
      out += static_cast<char>(0x80 | ((cp >> 6) & 0x3F));
      out += static_cast<char>(0x80 | (cp & 0x3F));
    }
  }
  uint32_t hex4() {
    if (i_ + 4 > s_.size()) fail("truncated \\u escape");
    uint32_t v = 0;
    for (int k = 0; k < 4; ++k) {
      const char c = s_[i_++];
      v <<= 4;
      if (c >= '0' && c <= '9')
        v |= c - '0';
      else if (c >= 'a' && c <= 'f')
        v |= c - 'a' + 10;
      else if (c >= 'A' && c <= 'F')
        v |= c - 'A' + 10;
      else
        fail("bad hex digit in \\u escape");
    }
    return v;
  }
  std::string string() {
    if (peek() != '"') fail("expected a string (only string values are supported)");
    ++i_;
    std::string out;
    while (i_ < s_.size() && s_[i_] != '"') {
      char c = s_[i_++];
      if (c != '\\') {
        out += c;
        continue;
      }
      if (i_ >= s_.size()) fail("truncated escape");
      c = s_[i_++];
      switch (c) {
        case 'n':
          out += '\n';
          break;
        case 't':
          out += '\t';
          break;
        case 'r':
          out += '\r';
          break;
        case 'b':
          out += '\b';
          break;
        case 'f':
          out += '\f';
          break;
        case '"':
        case '\\':
        case '/':
          out += c;
          break;
        case 'u': {
          uint32_t cp = hex4();
          if (cp >= 0xD800 && cp < 0xDC00) {
            if (i_ + 2 > s_.size() || s_[i_] != '\\' || s_[i_ + 1] != 'u') fail("lone surrogate");
            i_ += 2;
            const uint32_t lo = hex4();
            if (lo < 0xDC00 || lo >= 0xE000) fail("bad low surrogate");
            cp = 0x10000 + ((cp - 0xD800) << 10) + (lo - 0xDC00);
          }
          put_utf8(out, cp);
          break;
        }
        default:
          fail(std::string("unknown escape \\") + c);
      }
    }
    if (i_ >= s_.size()) fail("unterminated string");
    ++i_;
    return out;
  }

  const std::string& s_;
  int line_;
  std::size_t i_ = 0;
};

const char* kFiller[] = {
    "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again.",
    "The river runs past the old mill, and the children walk along it on their way to school.",
    "In the morning the market opens early, and the baker sells warm bread to the first customers.",
    "A light rain fell over the hills, and the farmers waited for the clouds to pass.",
    "The library was quiet in the afternoon, with only a few readers at the long wooden tables.",
    "Trains leave the station every hour, and the conductor checks the tickets of each passenger.",
};

/// Filler prose of about `tokens` tokens, drawn from kFiller with `rng`.
std::vector<std::string> filler_sentences(const llama::Tokenizer& tok, int64_t tokens,
                                          std::mt19937& rng) {
  std::vector<std::string> out;
  int64_t count = 0;
  std::uniform_int_distribution<int> pick(0, static_cast<int>(std::size(kFiller)) - 1);
  while (count < tokens) {
    out.push_back(kFiller[pick(rng)]);
    count += static_cast<int64_t>(tok.encode(" " + out.back()).size());
  }
  return out;
}

std::string join_with_insert(const std::vector<std::string>& sentences, double depth,
                             const std::string& insert) {
  const std::size_t at = static_cast<std::size_t>(depth * sentences.size());
  std::string text;
  // No space next to an insert that is its own paragraph.
  const bool paragraph = !insert.empty() && insert.front() == '\n';
  for (std::size_t i = 0; i <= sentences.size(); ++i) {
    if (i == at) text += (text.empty() || paragraph ? "" : " ") + insert;
    const bool after_insert = i == at && paragraph;
    if (i < sentences.size()) text += (text.empty() || after_insert ? "" : " ") + sentences[i];
  }
  return text;
}

}  // namespace

std::string read_file(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) throw std::runtime_error("cannot read '" + path + "'");
  std::ostringstream os;
  os << in.rdbuf();
  return os.str();
}

std::vector<RetrievalTask> load_tasks_jsonl(const std::string& path) {
  std::ifstream in(path);
  if (!in) throw std::runtime_error("cannot read task file '" + path + "'");
  std::vector<RetrievalTask> tasks;
  std::string line;
  int number = 0;
  while (std::getline(in, line)) {
    ++number;
    if (line.find_first_not_of(" \t\r") == std::string::npos) continue;
    RetrievalTask task;
    bool has[3] = {false, false, false};
    for (auto& [key, value] : JsonLine(line, number).parse()) {
      if (key == "context")
        task.context = value, has[0] = true;
      else if (key == "question")
        task.question = value, has[1] = true;
      else if (key == "answer")
        task.answer = value, has[2] = true;
      else if (key == "answer_prefix")
        task.answer_prefix = value;
    }
    const char* names[3] = {"context", "question", "answer"};
    for (int i = 0; i < 3; ++i) {
      if (!has[i]) {
        throw std::runtime_error("task file line " + std::to_string(number) + ": missing \"" +
                                 names[i] + "\"");
      }
    }
    if (task.answer.empty()) {
      throw std::runtime_error("task file line " + std::to_string(number) + ": empty answer");
    }
    tasks.push_back(std::move(task));
  }
  if (tasks.empty()) throw std::runtime_error("task file '" + path + "' holds no task");
  return tasks;
}

RetrievalTask make_passkey_task(const llama::Tokenizer& tok, int64_t context_tokens, double depth,
                                uint32_t seed) {
  std::mt19937 rng(seed);
  const int key = std::uniform_int_distribution<int>(10000, 99999)(rng);
  // Measured on SmolLM2-135M at 2 K tokens (README): the needle as its own paragraph and a
  // question that restates where the key is are what lift the full cache from 0.3 to >= 0.9.
  const std::string needle = "\n\nThe pass key is " + std::to_string(key) + ". Remember it. " +
                             std::to_string(key) + " is the pass key.\n\n";
  RetrievalTask task;
  task.context =
      "There is an important pass key hidden inside a lot of irrelevant text. Find it and "
      "memorize it.\n\n" +
      join_with_insert(filler_sentences(tok, context_tokens - 60, rng), depth, needle);
  task.question = "There is a pass key hidden in the text above. What is the pass key?";
  task.answer = std::to_string(key);
  task.answer_prefix = "The pass key is";
  return task;
}

std::vector<RetrievalTask> make_passkey_tasks(const llama::Tokenizer& tok, int64_t context_tokens,
                                              int count, uint32_t seed) {
  std::vector<RetrievalTask> tasks;
  for (int i = 0; i < count; ++i) {
    const double depth = count == 1 ? 0.5 : 0.05 + 0.9 * i / (count - 1);
    tasks.push_back(make_passkey_task(tok, context_tokens, depth, seed + 7919u * i));
  }
  return tasks;
}

std::vector<RetrievalTask> make_kv_tasks(const llama::Tokenizer& tok, int64_t context_tokens,
                                         int count, uint32_t seed) {
  static const char* kWords[] = {"apple",  "river",  "candle", "garden", "silver", "window",
                                 "tiger",  "planet", "orange", "forest", "bridge", "rocket",
                                 "violin", "castle", "desert", "harbor", "meadow", "pepper"};
  std::vector<RetrievalTask> tasks;
  for (int i = 0; i < count; ++i) {
    std::mt19937 rng(seed + 104729u * i);
    std::vector<std::string> words(std::begin(kWords), std::end(kWords));
    std::shuffle(words.begin(), words.end(), rng);
    words.resize(6);
    std::vector<int> codes;
    std::string facts;
    for (const auto& w : words) {
      codes.push_back(std::uniform_int_distribution<int>(1000, 9999)(rng));
      facts += "The secret code for " + w + " is " + std::to_string(codes.back()) + ". ";
    }
    auto sentences = filler_sentences(tok, context_tokens - 150, rng);
    const double depth = count == 1 ? 0.5 : 0.05 + 0.9 * i / (count - 1);
    const int which = std::uniform_int_distribution<int>(0, 5)(rng);
    RetrievalTask task;
    task.context = "Remember the secret codes in the following text.\n\n" +
                   join_with_insert(sentences, depth, facts);
    task.question =
        "The text above lists secret codes. What is the secret code for " + words[which] + "?";
    task.answer = std::to_string(codes[which]);
    task.answer_prefix = "The secret code for " + words[which] + " is";
    tasks.push_back(std::move(task));
  }
  return tasks;
}

std::string default_text() {
  static const char* kFiles[] = {"GPL-3",      "GFDL-1.3", "LGPL-2.1", "MPL-2.0",
                                 "Apache-2.0", "GPL-2",    "Artistic"};
  std::string text;
  for (const char* f : kFiles) {
    try {
      text += read_file(std::string("/usr/share/common-licenses/") + f) + "\n\n";
    } catch (const std::exception&) {
    }
  }
  if (text.empty()) {
    throw std::runtime_error(
        "no default text: /usr/share/common-licenses is missing; pass --text FILE");
  }
  return text;
}

}  // namespace kvpack::eval
