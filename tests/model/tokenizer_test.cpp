// Byte-level BPE tokenizer: the pre-tokenizer's splits and BPE merge order on a tiny vocabulary,
// then the real vocabulary (token ids checked against llama.cpp's tokenizer for this file).

#include "tokenizer.hpp"

#include <algorithm>
#include <catch2/catch.hpp>
#include <string>
#include <vector>

#include "model_fixture.hpp"
#include "unicode.hpp"

using kvpack::llama::PreTokenizer;
using kvpack::llama::Tokenizer;
using Words = std::vector<std::string>;
using Ids = std::vector<int32_t>;

namespace {

// The 256 byte symbols, then whatever extra tokens a test needs.
std::vector<std::string> byte_vocab() {
  std::vector<std::string> v;
  uint32_t moved = 0x100;  // printable Latin-1 bytes stand for themselves, others from U+0100 on
  for (int b = 0; b < 256; ++b) {
    const bool printable = (b >= 0x21 && b <= 0x7E) || (b >= 0xA1 && b <= 0xAC) || b >= 0xAE;
    std::string s;
    kvpack::llama::append_utf8(printable ? static_cast<uint32_t>(b) : moved++, s);
    v.push_back(s);
  }
  return v;
}

Tokenizer tiny_tokenizer(PreTokenizer pre, std::vector<std::string> extra,
                         const std::vector<std::string>& merges) {
  std::vector<std::string> vocab = byte_vocab();
  std::vector<int32_t> kinds(vocab.size(), 1);
  for (std::string& e : extra) {
    const bool control = e.size() > 2 && e[0] == '<' && e[1] == '|';
    vocab.push_back(e);
    kinds.push_back(control ? 3 : 1);
  }
  return Tokenizer(vocab, merges, kinds, pre, -1, -1, -1);
}

}  // namespace

TEST_CASE("tokenizer: GPT-2 pre-tokenizer splits", "[tokenizer]") {
  const Tokenizer t = tiny_tokenizer(PreTokenizer::kGpt2, {}, {});
  CHECK(t.pre_tokenize("Hello world") == Words{"Hello", " world"});
  CHECK(t.pre_tokenize("I'm here, they're not.") ==
        Words{"I", "'m", " here", ",", " they", "'re", " not", "."});
  CHECK(t.pre_tokenize("don't 'sup 'S") == Words{"don", "'t", " '", "sup", " '", "S"});
  CHECK(t.pre_tokenize("abc123def 45") == Words{"abc", "123", "def", " 45"});
  // Runs of spaces: all but the last, which joins the next word.
  CHECK(t.pre_tokenize("a   b") == Words{"a", "  ", " b"});
  CHECK(t.pre_tokenize("a \n\n b") == Words{"a", " \n\n", " b"});
  CHECK(t.pre_tokenize("a\n\nb") == Words{"a", "\n", "\n", "b"});
  CHECK(t.pre_tokenize("a\tb") == Words{"a", "\t", "b"});
  CHECK(t.pre_tokenize("end   ") == Words{"end", "   "});
  CHECK(t.pre_tokenize("  lead") == Words{" ", " lead"});
  CHECK(t.pre_tokenize("x = y+1;") == Words{"x", " =", " y", "+", "1", ";"});
  CHECK(t.pre_tokenize("").empty());
  // Unicode letters, marks, CJK, emoji (a symbol, grouped with punctuation).
  CHECK(t.pre_tokenize("h\xC3\xA9llo w\xC3\xB6rld") == Words{"h\xC3\xA9llo", " w\xC3\xB6rld"});
  CHECK(t.pre_tokenize("\xE6\x97\xA5\xE6\x9C\xAC\xE8\xAA\x9E") ==
        Words{"\xE6\x97\xA5\xE6\x9C\xAC\xE8\xAA\x9E"});  // 日本語: one run of letters
  CHECK(t.pre_tokenize("hi \xF0\x9F\x91\x8B!") == Words{"hi", " \xF0\x9F\x91\x8B!"});
  // Non-breaking space is white space but not the optional leading ' '.
  CHECK(t.pre_tokenize("a\xC2\xA0"
                       "b") == Words{"a", "\xC2\xA0", "b"});
  // Invalid UTF-8 bytes are kept (as "other" characters).
  CHECK(t.pre_tokenize("a\xFF\xFE b") == Words{"a", "\xFF\xFE", " b"});
}

TEST_CASE("tokenizer: SmolLM pre-tokenizer isolates every digit", "[tokenizer]") {
  const Tokenizer t = tiny_tokenizer(PreTokenizer::kGpt2SplitDigits, {}, {});
  CHECK(t.pre_tokenize("abc123def") == Words{"abc", "1", "2", "3", "def"});
  CHECK(t.pre_tokenize("a 12") == Words{"a", " ", "1", "2"});
  CHECK(t.pre_tokenize("1, 2, 3,") == Words{"1", ",", " ", "2", ",", " ", "3", ","});
  // Other number characters count as digits too (\p{N}): Arabic-Indic five, superscript two.
  CHECK(t.pre_tokenize("x\xD9\xA5\xC2\xB2") == Words{"x", "\xD9\xA5", "\xC2\xB2"});
}

TEST_CASE("tokenizer: BPE merges by rank, ties left to right", "[tokenizer]") {
  // Extra tokens 256.. : "ab", "abc", "bc", "aa".
  const Tokenizer t =
      tiny_tokenizer(PreTokenizer::kGpt2, {"ab", "abc", "bc", "aa"}, {"a b", "ab c", "b c", "a a"});
  CHECK(t.vocab_size() == 260);
  CHECK(t.encode("abc") == Ids{257});       // a b -> ab, then ab c -> abc
  CHECK(t.encode("bc") == Ids{258});        // b c
  CHECK(t.encode("aaa") == Ids{259, 'a'});  // leftmost pair first
  CHECK(t.encode("aaaa") == Ids{259, 259});
  CHECK(t.encode("cab") == Ids{'c', 256});
  // A space is byte 0x20, shown as U+0120 'Ġ' (symbol id 32).
  CHECK(t.encode(" ab") == Ids{32, 256});
  CHECK(t.decode({32, 256}) == " ab");
  CHECK(t.token_piece(32) == "\xC4\xA0");  // "Ġ"
  CHECK(t.find_piece("abc") == 257);
  CHECK(t.find_piece("zzz") == -1);
  CHECK_THROWS_AS(t.decode({260}), std::out_of_range);
  CHECK_THROWS_AS(t.decode({-1}), std::out_of_range);
  CHECK_THROWS_AS(Tokenizer(byte_vocab(), {"nospace"}, {}, PreTokenizer::kGpt2, -1, -1, -1),
                  std::invalid_argument);
}

TEST_CASE("tokenizer: special tokens only when asked", "[tokenizer]") {
  const Tokenizer t = tiny_tokenizer(PreTokenizer::kGpt2, {"<|im_start|>", "<|im_end|>"}, {});
  const int32_t start = 256, end = 257;
  const Ids with = t.encode("<|im_start|>hi<|im_end|>", true);
  CHECK(with == Ids{start, 'h', 'i', end});
  const Ids without = t.encode("<|im_start|>hi<|im_end|>", false);
  CHECK(without.size() == std::string("<|im_start|>hi<|im_end|>").size());
  CHECK(t.decode(with) == "<|im_start|>hi<|im_end|>");
  CHECK(t.decode(with, /*render_special=*/false) == "hi");
  CHECK(t.decode(without) == "<|im_start|>hi<|im_end|>");
}

TEST_CASE("tokenizer: chat template", "[tokenizer]") {
  using kvpack::llama::apply_chat_template;
  CHECK(apply_chat_template({{"user", "Hi"}}) ==
        "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging "
        "Face<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n");
  CHECK(apply_chat_template({{"system", "Be brief."}, {"user", "Hi"}, {"assistant", "Hello"}},
                            false) ==
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"
        "<|im_start|>assistant\nHello<|im_end|>\n");
}

TEST_CASE("tokenizer: real vocabulary round-trips and known ids", "[tokenizer][real-model]") {
  const Tokenizer* t = kvpack::test::reference_tokenizer();
  if (!t) return;
  CHECK(t->vocab_size() == 49152);
  CHECK(t->pre_tokenizer() == PreTokenizer::kGpt2SplitDigits);
  CHECK(t->bos_id() == 1);
  CHECK(t->eos_id() == 2);
  CHECK(t->token_piece(1) == "<|im_start|>");
  CHECK(t->token_piece(2) == "<|im_end|>");

  const std::vector<std::string> texts = {
      "Hello world",
      "The quick brown fox jumps over the lazy dog. It's 3:45 pm; 1,234.56 units!",
      "Caf\xC3\xA9 na\xC3\xAFve r\xC3\xA9sum\xC3\xA9 \xC3\x85ngstr\xC3\xB6m Stra\xC3\x9F"
      "e",
      "\xE6\x97\xA5\xE6\x9C\xAC\xE8\xAA\x9E\xE3\x81\xAE\xE3\x83\x86\xE3\x82\xAD\xE3\x82\xB9"
      "\xE3\x83\x88 \xE4\xB8\xAD\xE6\x96\x87 \xED\x95\x9C\xEA\xB5\xAD\xEC\x96\xB4",
      "emoji \xF0\x9F\x98\x80\xF0\x9F\x91\x8D\xF0\x9F\x8F\xBD \xE2\x9D\xA4\xEF\xB8\x8F done",
      "  leading\tand\t\ttabs   \n\n\n  trailing   \r\n",
      "def f(x):\n    return x**2  # square\n",
      "",
      " ",
  };
  for (const std::string& s : texts) {
    INFO("text: " << s);
    const Ids ids = t->encode(s);
    CHECK(t->decode(ids) == s);
    for (int32_t id : ids) CHECK(t->kind(id) == kvpack::llama::TokenKind::kNormal);
  }

  // "Hello" and " world" are single tokens.
  const Ids hello = t->encode("Hello world");
  REQUIRE(hello.size() == 2);
  CHECK(t->token_text(hello[0]) == "Hello");
  CHECK(t->token_text(hello[1]) == " world");
  CHECK(hello == Ids{19556, 905});
  // Ids from llama.cpp's llama-tokenize on this file.
  CHECK(t->encode("What is the capital of France?") == Ids{1780, 314, 260, 3575, 282, 4649, 47});
  CHECK(t->encode("1, 2, 3, 4,") == Ids{33, 28, 216, 34, 28, 216, 35, 28, 216, 36, 28});
  CHECK(
      t->encode("Caf\xC3\xA9 na\xC3\xAFve r\xC3\xA9sum\xC3\xA9 \xC3\x85ngstr\xC3\xB6m Stra\xC3\x9F"
                "e") == Ids{51, 1939, 2756, 15486, 46494, 412, 2756, 5422, 2756, 5549, 223, 863,
                            1321, 45682, 19144, 34878, 85});
  CHECK(t->encode("<|im_start|>user\nHi<|im_end|>\n", true) == Ids{1, 4093, 198, 26843, 2, 198});
  // Digits one by one.
  const Ids digits = t->encode("12345");
  REQUIRE(digits.size() == 5);
  CHECK(t->decode({digits[0]}) == "1");

  // Chat markup: special tokens become their ids only with parse_special.
  const std::string chat = kvpack::llama::apply_chat_template({{"user", "Hi"}});
  const Ids parsed = t->encode(chat, true);
  CHECK(parsed.front() == 1);
  CHECK(parsed.back() == 198);  // "\n" after "assistant"
  CHECK(std::count(parsed.begin(), parsed.end(), 1) == 3);
  CHECK(std::count(parsed.begin(), parsed.end(), 2) == 2);
  CHECK(t->decode(parsed) == chat);
  const Ids plain = t->encode(chat, false);
  CHECK(std::count(plain.begin(), plain.end(), 1) == 0);
  CHECK(t->decode(plain) == chat);
}
