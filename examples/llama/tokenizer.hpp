#pragma once
// GPT-2 style byte-level BPE tokenizer built from a GGUF file's tokenizer.ggml.* metadata, and
// the ChatML template SmolLM2-Instruct was trained with.

#include <cstdint>
#include <string>
#include <string_view>
#include <unordered_map>
#include <vector>

#include "gguf.hpp"

namespace kvpack::llama {

/// How text is cut into words before BPE.
enum class PreTokenizer {
  kGpt2,             ///< the GPT-2 pattern: contractions, letters, numbers, punctuation, spaces
  kGpt2SplitDigits,  ///< every digit alone first, then the GPT-2 pattern (StarCoder, SmolLM)
};

/// Token kinds as GGUF numbers them (tokenizer.ggml.token_type).
enum class TokenKind : int32_t {
  kNormal = 1,
  kUnknown = 2,
  kControl = 3,
  kUserDefined = 4,
  kUnused = 5,
  kByte = 6,
};

class Tokenizer {
 public:
  /// \param tokens     vocabulary strings in the byte-to-unicode alphabet ("Ġ" is a space)
  /// \param merges     "left right" pairs, highest priority first
  /// \param kinds      one TokenKind per token, or empty for all-normal
  Tokenizer(std::vector<std::string> tokens, const std::vector<std::string>& merges,
            std::vector<int32_t> kinds, PreTokenizer pre, int32_t bos_id, int32_t eos_id,
            int32_t unknown_id);

  /// Reads tokenizer.ggml.{model, pre, tokens, merges, token_type, *_token_id}.
  static Tokenizer from_gguf(const GgufFile& file);

  /// Text -> token ids. With `parse_special`, control and user-defined token strings in the text
  /// (e.g. "<|im_start|>") become their ids; otherwise they are tokenized as plain text.
  std::vector<int32_t> encode(std::string_view text, bool parse_special = false) const;

  /// Token ids -> text (bytes exactly as encoded). Control tokens are written as their text when
  /// `render_special`, left out otherwise. Throws std::out_of_range for an id outside the vocab.
  std::string decode(const std::vector<int32_t>& ids, bool render_special = true) const;

  /// Decoded bytes of one token.
  std::string token_text(int32_t id, bool render_special = true) const;
  /// Raw vocabulary string of a token (byte-to-unicode alphabet).
  const std::string& token_piece(int32_t id) const;
  /// Id of a raw vocabulary string, or -1.
  int32_t find_piece(const std::string& piece) const;

  int32_t vocab_size() const { return static_cast<int32_t>(tokens_.size()); }
  int32_t bos_id() const { return bos_id_; }
  int32_t eos_id() const { return eos_id_; }
  TokenKind kind(int32_t id) const;
  PreTokenizer pre_tokenizer() const { return pre_; }

  /// The words the pre-tokenizer cuts `text` into (exposed for tests).
  std::vector<std::string> pre_tokenize(std::string_view text) const;

 private:
  void check_id(int32_t id) const;
  void encode_plain(std::string_view text, std::vector<int32_t>& out) const;
  void encode_word(std::string_view word, std::vector<int32_t>& out) const;
  int merge_rank(std::string_view left, std::string_view right) const;

  std::vector<std::string> tokens_;
  std::vector<int32_t> kinds_;
  std::unordered_map<std::string, int32_t> token_ids_;
  std::unordered_map<std::string, int> merge_ranks_;  // key: "left right"
  std::vector<int32_t> special_ids_;                  // control / user-defined, longest first
  PreTokenizer pre_;
  int32_t bos_id_;
  int32_t eos_id_;
  int32_t unknown_id_;
  std::string byte_symbols_[256];  // byte -> its UTF-8 symbol in the vocabulary alphabet
  std::unordered_map<uint32_t, uint8_t> symbol_bytes_;  // code point -> byte
};

/// One chat turn.
struct ChatMessage {
  std::string role;  // "system", "user" or "assistant"
  std::string content;
};

/// System prompt the SmolLM2-Instruct template inserts when the conversation has none.
inline constexpr const char* kSmolLmDefaultSystemPrompt =
    "You are a helpful AI assistant named SmolLM, trained by Hugging Face";

/// ChatML as in the model's template: "<|im_start|>role\ncontent<|im_end|>\n" per message, a
/// default system message first when the first message is not one, and
/// "<|im_start|>assistant\n" at the end when `add_generation_prompt`. Encode the result with
/// parse_special = true.
std::string apply_chat_template(const std::vector<ChatMessage>& messages,
                                bool add_generation_prompt = true,
                                const std::string& default_system = kSmolLmDefaultSystemPrompt);

}  // namespace kvpack::llama
