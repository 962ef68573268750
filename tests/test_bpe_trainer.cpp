// BPE training: merge order on a tiny corpus, the vocabulary-size floor, and a trained tokenizer that loads
// and round-trips.
#include <gtest/gtest.h>

#include <filesystem>
#include <fstream>

#include "core/error.h"
#include "tokenizer/bpe_trainer.h"
#include "tokenizer/tokenizer.h"

TEST(BpeTrainer, MergesMostFrequentPairFirst) {
  // "ab" occurs 5+3 times, then "ab"+"c" 3 times; ties break toward the earlier-created pair.
  const auto merges = dsv3::learn_bpe_merges({{"ab", 5}, {"abc", 3}, {"xy", 1}}, 10, 2);
  ASSERT_EQ(merges.size(), 2u);
  EXPECT_EQ(merges[0], (std::pair<std::string, std::string>{"a", "b"}));
  EXPECT_EQ(merges[1], (std::pair<std::string, std::string>{"ab", "c"}));
}

TEST(BpeTrainer, OverlappingPairsCountOnce) {
  // "aaaa" holds (a, a) three times but merges left to right into "aa" "aa", then "aaaa".
  const auto merges = dsv3::learn_bpe_merges({{"aaaa", 2}}, 5, 1);
  ASSERT_EQ(merges.size(), 2u);
  EXPECT_EQ(merges[0], (std::pair<std::string, std::string>{"a", "a"}));
  EXPECT_EQ(merges[1], (std::pair<std::string, std::string>{"aa", "aa"}));
}

TEST(BpeTrainer, TrainsALoadableTokenizer) {
  namespace fs = std::filesystem;
  const fs::path dir = fs::temp_directory_path() / "dsv3_bpe_trainer_test";
  fs::remove_all(dir);
  fs::create_directories(dir);
  {
    std::ofstream f(dir / "corpus.txt");
    for (int i = 0; i < 300; ++i)
      f << "The quick brown fox jumps over the lazy dog " << i << ". 深度求索 <｜User｜>hi<｜Assistant｜>\n";
  }
  const std::string tiny = (dir / "tiny").string();
  const std::string err = [&] {
    try {
      dsv3::train_bpe_tokenizer({(dir / "corpus.txt").string()}, "deepseek-v3", tiny, {.vocab_size = 100});
    } catch (const dsv3::InputError& e) {
      return std::string(e.what());
    }
    return std::string();
  }();
  EXPECT_NE(err.find("--vocab-size 100 is too small"), std::string::npos) << err;

  const std::string out = (dir / "tok").string();
  const auto report = dsv3::train_bpe_tokenizer({(dir / "corpus.txt").string()}, "deepseek-v3", out, {.vocab_size = 400});
  EXPECT_GT(report.merges, 50u);
  const dsv3::Tokenizer t = dsv3::Tokenizer::load(out);
  EXPECT_EQ(t.bos_id(), 0);
  EXPECT_EQ(t.eos_id(), 1);
  EXPECT_LE(t.vocab_size(), 400u);
  for (const std::string s : {"The quick brown fox", "unseen wörds and 数字 123456", "<｜User｜>hi<｜Assistant｜>"})
    EXPECT_EQ(t.decode(t.encode(s)), s);
  EXPECT_EQ(t.encode("<｜User｜>").size(), 1u);
  fs::remove_all(dir);
}
