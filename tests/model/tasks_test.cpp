// The evaluation's JSON Lines task reader: fields it uses, fields it ignores (any JSON value),
// and errors that name the line and column. No model needed.
#if defined(KVPACK_HAVE_EVAL_TASKS)
#include "tasks.hpp"

#include <catch2/catch.hpp>
#include <string>

using Catch::Matchers::Contains;
using kvpack::eval::parse_tasks_jsonl;

TEST_CASE("Task files: numeric and nested fields are accepted and ignored", "[tasks]") {
  const std::string text =
      "{\"context\": \"The key is 42.\", \"question\": \"What is the key?\", \"answer\": \"42\", "
      "\"depth\": 0.05, \"length\": 2048, \"meta\": {\"source\": [\"ruler\", 1, null, true]}}\n"
      "\n"
      "{\"id\": 7, \"context\": \"caf\\u00e9 \\ud83d\\ude00\", \"question\": \"q\", "
      "\"answer\": 51234, \"answer_prefix\": \"The pass key is\"}\r\n";
  const auto tasks = parse_tasks_jsonl(text, "t.jsonl");
  REQUIRE(tasks.size() == 2);
  REQUIRE(tasks[0].context == "The key is 42.");
  REQUIRE(tasks[0].question == "What is the key?");
  REQUIRE(tasks[0].answer == "42");
  REQUIRE(tasks[0].answer_prefix.empty());
  REQUIRE(tasks[1].context == "caf\xc3\xa9 \xf0\x9f\x98\x80");
  REQUIRE(tasks[1].answer == "51234");  // a numeric answer, as benchmark exports write passkeys
  REQUIRE(tasks[1].answer_prefix == "The pass key is");
}

TEST_CASE("Task files: malformed lines are refused with their line and column", "[tasks]") {
  const std::string good = "{\"context\": \"c\", \"question\": \"q\", \"answer\": \"a\"}\n";
  REQUIRE_THROWS_WITH(parse_tasks_jsonl(good + "{\"context\": \"c\", \"question\": }\n", "t.jsonl"),
                      Contains("t.jsonl line 2, column 30"));
  REQUIRE_THROWS_WITH(parse_tasks_jsonl(good + "[1, 2]\n", "t.jsonl"),
                      Contains("line 2: expected a JSON object, got array"));
  REQUIRE_THROWS_WITH(parse_tasks_jsonl("{\"context\": \"c\", \"answer\": \"a\"}", "t.jsonl"),
                      Contains("line 1: missing \"question\""));
  REQUIRE_THROWS_WITH(
      parse_tasks_jsonl("{\"context\": 3, \"question\": \"q\", \"answer\": \"a\"}", "t.jsonl"),
      Contains("\"context\" must be a string, got number"));
  REQUIRE_THROWS_WITH(
      parse_tasks_jsonl("{\"context\": \"c\", \"question\": \"q\", \"answer\": \"\"}", "t.jsonl"),
      Contains("line 1: empty answer"));
  REQUIRE_THROWS_WITH(parse_tasks_jsonl("\n  \n", "t.jsonl"), Contains("t.jsonl holds no task"));
  // Found by fuzzing: a number beyond double is valid syntax that the parser refuses with an
  // exception of another kind; it must still be a runtime_error naming the line.
  REQUIRE_THROWS_WITH(parse_tasks_jsonl(good + "{\"context\": \"c\", \"question\": \"q\", "
                                               "\"answer\": \"a\", \"len\": 5e888}\n",
                                        "t.jsonl"),
                      Contains("t.jsonl line 2: ") && Contains("number overflow"));
  REQUIRE_THROWS_WITH(kvpack::eval::load_tasks_jsonl("/nonexistent/tasks.jsonl"),
                      Contains("cannot read task file '/nonexistent/tasks.jsonl'"));
}
#endif
