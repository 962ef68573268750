// `dsv3 prepare-data`: tokenize text / JSONL files into training shards.
#include <cstdio>
#include <filesystem>

#include "cli/commands.h"
#include "core/error.h"
#include "train/prepare.h"
#include "tokenizer/tokenizer.h"

namespace dsv3::cli {

void add_prepare_data(CLI::App& app) {
  auto* c = app.add_subcommand("prepare-data", "Tokenize text or JSONL files into binary training shards with a "
                                               "held-out validation split");
  struct Args {
    std::string tokenizer, out;
    std::vector<std::string> inputs;
    PrepareOptions opt;
  };
  auto a = std::make_shared<Args>();
  c->add_option("--tokenizer", a->tokenizer,
                "Tokenizer file or directory (tokenizer.json), 'deepseek-v3' (bundled), or 'bytes' (UTF-8 bytes 0..255, EOS 256)")->required();
  c->add_option("--input", a->inputs, "Input files: *.jsonl ({\"text\": ...} per line) or text")->required();
  c->add_option("--output", a->out, "Output data directory")->required();
  c->add_option("--doc-sep", a->opt.doc_sep,
                "How text files split into documents: file | blank (blank-line-separated paragraphs) | line | a "
                "separator line such as %")->capture_default_str();
  c->add_option("--val-fraction", a->opt.val_fraction, "Fraction of documents held out for validation")->capture_default_str();
  c->add_option("--shard-tokens", a->opt.shard_tokens, "Tokens per training shard")->capture_default_str();
  c->add_option("--seed", a->opt.seed, "Seed of the validation split")->capture_default_str();
  c->callback([=] {
    PrepareOptions opt = a->opt;
    BatchEncoder enc;
    if (a->tokenizer == "bytes") {
      opt.vocab_size = 257;
      opt.eos_id = 256;
      enc = [](const std::vector<std::string>& docs) {
        std::vector<std::vector<int32_t>> out(docs.size());
        for (size_t i = 0; i < docs.size(); ++i)
          for (unsigned char ch : docs[i]) out[i].push_back(int32_t(ch));
        return out;
      };
    } else {
      auto tok = std::make_shared<Tokenizer>(Tokenizer::load(a->tokenizer));
      opt.vocab_size = tok->vocab_size();
      opt.eos_id = tok->eos_id();
      opt.bos_id = tok->bos_id();
      opt.tokenizer = std::filesystem::absolute(a->tokenizer).string();
      // Each document as the model sees it at inference: BOS (when the tokenizer adds one), then its text.
      enc = [tok](const std::vector<std::string>& docs) {
        auto ids = tok->encode_batch(docs);
        if (tok->add_bos_token() && tok->bos_id() >= 0)
          for (auto& v : ids) v.insert(v.begin(), tok->bos_id());
        return ids;
      };
    }
    PrepareStats st = prepare_data(a->inputs, a->out, enc, opt);
    std::fprintf(stderr, "wrote %s: %lld documents (%lld held out), %lld train tokens in %lld shard(s), %lld validation tokens, vocab %lld\n",
                 a->out.c_str(), (long long)st.documents, (long long)st.val_documents, (long long)st.train_tokens,
                 (long long)st.shards, (long long)st.val_tokens, (long long)opt.vocab_size);
  });
}

}  // namespace dsv3::cli
