#pragma once
// Evaluation inputs: retrieval tasks (from a JSONL file or generated with a seed) and the long
// text used for agreement / KL / perplexity.

#include <cstdint>
#include <string>
#include <vector>

#include "tokenizer.hpp"

namespace kvpack::eval {

/// One retrieval task. The context is compressed before the question is seen (query-agnostic);
/// the answer counts as retrieved when the greedy continuation contains it.
struct RetrievalTask {
  std::string context;
  std::string question;
  std::string answer;
  std::string answer_prefix;  ///< optional start of the assistant turn ("The pass key is")
};

/// Reads one JSON object per line (JSON Lines) with the string fields "context" and
/// "question", "answer" (a string or a number) and the optional "answer_prefix"; other fields
/// may hold any JSON value (numbers, arrays, objects) and are ignored. Blank lines are skipped.
/// Throws std::runtime_error naming the file, the line and, for malformed JSON, the column.
std::vector<RetrievalTask> load_tasks_jsonl(const std::string& path);

/// load_tasks_jsonl on text already in memory; `source` names it in error messages.
std::vector<RetrievalTask> parse_tasks_jsonl(const std::string& text, const std::string& source);

/// Passkey retrieval: a 5-digit key hidden in filler prose at `depth` (0 = start, 1 = end) of a
/// context of about `context_tokens` tokens. Deterministic for a seed.
RetrievalTask make_passkey_task(const llama::Tokenizer& tokenizer, int64_t context_tokens,
                                double depth, uint32_t seed);

/// `count` passkey tasks at depths spread evenly over [0.05, 0.95].
std::vector<RetrievalTask> make_passkey_tasks(const llama::Tokenizer& tokenizer,
                                              int64_t context_tokens, int count, uint32_t seed);

/// Key-value lookup: `pairs` lines "The code for <word> is <4 digits>." and a question about one
/// of them (several questions over one context: see make_kv_questions).
std::vector<RetrievalTask> make_kv_tasks(const llama::Tokenizer& tokenizer, int64_t context_tokens,
                                         int count, uint32_t seed);

/// The default long text: the license texts Debian ships in /usr/share/common-licenses
/// (natural English prose, present on every Debian machine). Throws when none is readable.
std::string default_text();

/// KVzap's calibration documents: every license text in /usr/share/common-licenses but GPL-3,
/// whose start is the text run's scored window (LGPL-3 last: the held-out one).
std::vector<std::string> kvzap_documents();

std::string read_file(const std::string& path);

}  // namespace kvpack::eval
