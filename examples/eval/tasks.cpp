#include "tasks.hpp"

#include <algorithm>
#include <fstream>
#include <nlohmann/json.hpp>
#include <random>
#include <sstream>
#include <stdexcept>

namespace kvpack::eval {
namespace {

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

std::vector<RetrievalTask> parse_tasks_jsonl(const std::string& text, const std::string& source) {
  std::vector<RetrievalTask> tasks;
  std::istringstream in(text);
  std::string line;
  int number = 0;
  auto fail = [&](const std::string& what) {
    throw std::runtime_error(source + " line " + std::to_string(number) + ": " + what);
  };
  while (std::getline(in, line)) {
    ++number;
    if (line.find_first_not_of(" \t\r") == std::string::npos) continue;
    nlohmann::json object;
    try {
      object = nlohmann::json::parse(line);
    } catch (const nlohmann::json::parse_error& e) {
      // e.byte: 1-based offset of the character the parser stopped at.
      throw std::runtime_error(source + " line " + std::to_string(number) + ", column " +
                               std::to_string(e.byte) + ": " + e.what());
    } catch (const nlohmann::json::exception& e) {
      // Valid syntax the parser still refuses, e.g. a number beyond double (found by fuzzing).
      fail(e.what());
    }
    if (!object.is_object()) fail("expected a JSON object, got " + std::string(object.type_name()));
    // Fields the task uses must be text (the answer may be a number, as exports write passkeys);
    // every other field may hold any JSON value and is ignored.
    auto text_field = [&](const char* key, bool required, bool number_ok) -> std::string {
      const auto it = object.find(key);
      if (it == object.end()) {
        if (required) fail(std::string("missing \"") + key + "\"");
        return {};
      }
      if (it->is_string()) return it->get<std::string>();
      if (number_ok && it->is_number()) return it->dump();
      fail(std::string("\"") + key + "\" must be a string" + (number_ok ? " or a number" : "") +
           ", got " + it->type_name());
      return {};
    };
    RetrievalTask task;
    task.context = text_field("context", true, false);
    task.question = text_field("question", true, false);
    task.answer = text_field("answer", true, true);
    task.answer_prefix = text_field("answer_prefix", false, false);
    if (task.answer.empty()) fail("empty answer");
    tasks.push_back(std::move(task));
  }
  if (tasks.empty()) throw std::runtime_error(source + " holds no task");
  return tasks;
}

std::vector<RetrievalTask> load_tasks_jsonl(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) throw std::runtime_error("cannot read task file '" + path + "'");
  std::ostringstream text;
  text << in.rdbuf();
  return parse_tasks_jsonl(text.str(), "task file '" + path + "'");
}

RetrievalTask make_passkey_task(const llama::Tokenizer& tok, int64_t context_tokens, double depth,
                                uint32_t seed) {
  std::mt19937 rng(seed);
  const int key = std::uniform_int_distribution<int>(10000, 99999)(rng);
  // Measured on SmolLM2-135M at 2 K tokens (docs/evaluation.md): the needle as its own paragraph
  // and a question that restates where the key is are what lift the full cache from 0.3 to >= 0.9.
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

std::vector<std::string> kvzap_documents() {
  std::vector<std::string> docs;
  for (const char* f : {"Apache-2.0", "Artistic", "BSD", "CC0-1.0", "GFDL-1.2", "GFDL-1.3", "GPL-1",
                        "GPL-2", "LGPL-2", "LGPL-2.1", "MPL-1.1", "MPL-2.0", "LGPL-3"}) {
    try {
      docs.push_back(read_file(std::string("/usr/share/common-licenses/") + f));
    } catch (const std::exception&) {
    }
  }
  return docs;
}

}  // namespace kvpack::eval
