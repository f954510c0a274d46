// Checkpoints: safetensors reading/writing and validation, atomic files, model and training
// checkpoints (bit-exact resume, crash safety, corrupt files), and HF LLaMA/Qwen2 import
// checked against a naive reference forward written here from the raw arrays.
#include "test_util.hpp"

#include <mixmoe/io/atomic_file.hpp>
#include <mixmoe/io/hf_import.hpp>
#include <mixmoe/io/json_config.hpp>
#include <mixmoe/io/safetensors.hpp>
#include <mixmoe/train/checkpoint.hpp>

#include <unistd.h>

#include <bit>
#include <cmath>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <limits>
#include <map>
#include <string>

// Each test file in its own namespace: the unity build compiles several files as one unit.
namespace test_checkpoint {

using namespace mixmoe;
using namespace mixmoe::test;
namespace fs = std::filesystem;
using nlohmann::json;

namespace {

template <class T>
using MixLM =
    DecoderLM<CausalSelfAttention<T>, MixedMoE<FourierFeatures<TopK<>, transform::FFTMagnitude<>>,
                                               ExpertGroup<SwiGLU<T>, tag::lm>, ExpertGroup<SwiGLU<T>, tag::mt>>>;
template <class T>
using DenseLM = DecoderLM<CausalSelfAttention<T>, SwiGLU<T>>;


void write_bytes(const fs::path& p, const std::string& bytes) {
  std::ofstream f(p, std::ios::binary | std::ios::trunc);
  f.write(bytes.data(), static_cast<std::streamsize>(bytes.size()));
}

/// A safetensors file from a header text and a buffer of `buffer` zero bytes.
std::string make_file(const std::string& header, std::size_t buffer) {
  std::string out(8, '\0');
  const std::uint64_t n = header.size();
  std::memcpy(out.data(), &n, 8);
  return out + header + std::string(buffer, '\0');
}

ModelConfig moe_config(std::uint64_t seed) {
  ModelConfig c;
  c.vocab = 13;
  c.d_model = 8;
  c.layers = 2;
  c.heads = 2;
  c.kv_heads = 1;
  c.d_ff = 16;
  c.seed = seed;
  c.init_std = 0.3;
  c.moe.experts_per_group = {2, 3};
  c.moe.top_k = 1;
  c.moe.expert_hidden = 6;
  return c;
}

template <class T>
bool bit_equal(const Tensor<T>& a, const Tensor<T>& b) {
  if (!(a.shape() == b.shape())) return false;
  const auto va = a.to_vector(), vb = b.to_vector();
  return std::memcmp(va.data(), vb.data(), va.size() * sizeof(T)) == 0;
}

template <Module M>
bool same_parameters(M& a, M& b) {
  auto pa = named_parameters(a), pb = named_parameters(b);
  if (pa.size() != pb.size()) return false;
  for (std::size_t i = 0; i < pa.size(); ++i)
    if (pa[i].first != pb[i].first || !bit_equal(pa[i].second.value(), pb[i].second.value())) return false;
  return true;
}

}  // namespace

// ---- safetensors ------------------------------------------------------------------------

TEST_CASE("safetensors: write and read back every dtype, metadata, 8-byte aligned header", "[checkpoint]") {
  Generator g(1);
  const auto a = Tensor<float>::randn({3, 4}, g);
  const auto b = Tensor<double>::randn({2, 1, 5}, g);
  const auto c = Tensor<std::int64_t>::from({-3, 0, 1LL << 40}, {3});
  const auto d = Tensor<std::int32_t>::from({7, -8}, {2, 1});
  const auto e = Tensor<float>::from({1.0f, 1.0f + 0x1.0p-8f, 1.0f + 3 * 0x1.0p-8f, -2.5f}, {4});
  const auto h = Tensor<float>::from({1.0f, 1.0f / 3, 0x1.0p-24f, 65504.0f, 70000.0f, -0.0f}, {6});
  const auto empty = Tensor<float>::zeros({0, 3});
  SafetensorsWriter w;
  w.add("a", a);
  w.add("b.x", b);
  w.add("c", c);
  w.add("d", d);
  w.add("e", e, Dtype::BF16);
  w.add("h", h, Dtype::F16);
  w.add("empty", empty);
  w.set_metadata("note", "hello");
  MIXMOE_REQUIRE_ERROR(w.add("a", a), "added twice");
  MIXMOE_REQUIRE_ERROR(w.add("z", c, Dtype::F32), "cannot be stored as F32");

  const std::string bytes = w.serialize();
  std::uint64_t n = 0;
  std::memcpy(&n, bytes.data(), 8);
  REQUIRE(n % 8 == 0);
  REQUIRE(bytes.size() == 8 + n + 12 * 4 + 10 * 8 + 3 * 8 + 2 * 4 + 4 * 2 + 6 * 2);
  const auto f = SafetensorsFile::parse(bytes, "mem.safetensors");
  REQUIRE(f.size() == 7);
  REQUIRE(f.metadata().at("note") == "hello");
  REQUIRE(bit_equal(f.get<float>("a"), a));
  REQUIRE(bit_equal(f.get<double>("b.x"), b));
  REQUIRE(f.get<std::int64_t>("c").to_vector() == c.to_vector());
  REQUIRE(f.get<std::int32_t>("d").to_vector() == d.to_vector());
  REQUIRE(f.get<double>("a").to_vector()[5] == static_cast<double>(a.to_vector()[5]));  // F32 -> double
  REQUIRE(f.get<float>("empty").shape() == Shape{0, 3});
  // BF16: round to nearest even (1 + 2^-8 is a tie -> 1; 1 + 3 * 2^-8 -> 1 + 2^-6).
  REQUIRE(f.get<float>("e").to_vector() == std::vector<float>{1.0f, 1.0f, 1.0f + 0x1.0p-6f, -2.5f});
  REQUIRE(f.raw("e").size() == 8);
  REQUIRE(static_cast<unsigned char>(f.raw("e")[1]) == 0x3f);  // little-endian 0x3f80
  // F16: 1/3 -> 0x3555 = 0.333251953125, the smallest subnormal, the largest half, overflow to inf.
  const auto hv = f.get<float>("h").to_vector();
  REQUIRE(hv[0] == 1.0f);
  REQUIRE(hv[1] == 0.333251953125f);
  REQUIRE(hv[2] == 0x1.0p-24f);
  REQUIRE(hv[3] == 65504.0f);
  REQUIRE(std::isinf(hv[4]));
  REQUIRE(std::signbit(hv[5]));
  REQUIRE(float_to_f16(1.0f / 3) == 0x3555);
  REQUIRE(f16_to_float(0xfc00) == -INFINITY);
  REQUIRE(std::isnan(f16_to_float(0x7e00)));
  REQUIRE(std::isnan(bf16_to_float(float_to_bf16(NAN))));
  // Integers cannot be read as floats and the other way round, with the tensor named.
  MIXMOE_REQUIRE_ERROR(f.get<float>("c"),
                       "mem.safetensors: tensor 'c' has dtype I64, which cannot be read as floating");
  MIXMOE_REQUIRE_ERROR(f.get<std::int32_t>("a"), "tensor 'a' has dtype F32, which cannot be read as integers");
  MIXMOE_REQUIRE_ERROR(f.get<float>("nope"), "no tensor 'nope'");
  MIXMOE_REQUIRE_ERROR(f.get<float>("a", Shape{4, 3}), "tensor 'a' has shape (3, 4), expected (4, 3)");

  // A file written by hand (not by our writer): F16 [1, -2] and BF16 [0.5], header padded with spaces.
  std::string header = R"({"x":{"dtype":"F16","shape":[2],"data_offsets":[0,4]},)"
                       R"("y":{"dtype":"BF16","shape":[1,1],"data_offsets":[4,6]}})";
  header.append((8 - header.size() % 8) % 8, ' ');
  std::string hand = make_file(header, 0) + std::string("\x00\x3c\x00\xc0\x00\x3f", 6);
  const auto fh = SafetensorsFile::parse(hand, "hand");
  REQUIRE(fh.get<double>("x").to_vector() == std::vector<double>{1.0, -2.0});
  REQUIRE(fh.get<float>("y").to_vector() == std::vector<float>{0.5f});
  REQUIRE(fh.metadata().empty());
}

TEST_CASE("safetensors: every malformed file is refused, naming the file and the tensor", "[checkpoint]") {
  SafetensorsWriter w;
  Generator g(2);
  w.add("layer.weight", Tensor<float>::randn({4, 6}, g));
  w.add("layer.bias", Tensor<float>::randn({4}, g));
  const std::string good = w.serialize();
  std::uint64_t n = 0;
  std::memcpy(&n, good.data(), 8);
  const auto parse = [](const std::string& bytes) { return SafetensorsFile::parse(bytes, "bad.safetensors"); };
  REQUIRE(parse(good).size() == 2);

  // Truncated at several points.
  MIXMOE_REQUIRE_ERROR(parse(good.substr(0, 0)), "bad.safetensors: truncated: 0 bytes");
  MIXMOE_REQUIRE_ERROR(parse(good.substr(0, 5)), "truncated: 5 bytes, too short");
  MIXMOE_REQUIRE_ERROR(parse(good.substr(0, 8)), "is larger than the file (8 bytes)");
  MIXMOE_REQUIRE_ERROR(parse(good.substr(0, 8 + n / 2)), "is larger than the file");
  MIXMOE_REQUIRE_ERROR(parse(good.substr(0, 8 + n)),
                       "tensor 'layer.bias': shape [4] is larger than the data buffer (0 bytes)");
  MIXMOE_REQUIRE_ERROR(parse(good.substr(0, good.size() - 1)), "go past the end of the data buffer");
  MIXMOE_REQUIRE_ERROR(parse(good + "x"), "trailing bytes");

  // Header size too big.
  std::string big = good;
  const std::uint64_t huge = 1ULL << 40;
  std::memcpy(big.data(), &huge, 8);
  MIXMOE_REQUIRE_ERROR(parse(big), "header size 1099511627776 exceeds the limit");
  const std::uint64_t past = good.size();
  std::memcpy(big.data(), &past, 8);
  MIXMOE_REQUIRE_ERROR(parse(big), "is larger than the file");

  const std::string t = R"("t":{"dtype":"F32","shape":[2,3],"data_offsets":[0,24]})";
  REQUIRE(parse(make_file("{" + t + "}", 24)).size() == 1);
  MIXMOE_REQUIRE_ERROR(parse(make_file("{" + t, 24)), "bad.safetensors: the header is not valid JSON");
  MIXMOE_REQUIRE_ERROR(parse(make_file("[1, 2]", 0)), "does not start with '{'");
  MIXMOE_REQUIRE_ERROR(parse(make_file(R"({"t":{"dtype":"F17","shape":[2,3],"data_offsets":[0,24]}})", 24)),
                       "tensor 't': unknown dtype 'F17'");
  MIXMOE_REQUIRE_ERROR(parse(make_file(R"({"t":{"dtype":"F32","shape":[2,4],"data_offsets":[0,24]}})", 40)),
                       "tensor 't': shape [2,4] of F32 needs 32 bytes but data_offsets [0, 24] hold 24");
  MIXMOE_REQUIRE_ERROR(parse(make_file(R"({"t":{"dtype":"F64","shape":[2,3],"data_offsets":[0,24]}})", 56)),
                       "needs 48 bytes");
  MIXMOE_REQUIRE_ERROR(parse(make_file(R"({"t":{"dtype":"F32","shape":[-2,3],"data_offsets":[0,24]}})", 24)),
                       "tensor 't': shape [-2,3] has a negative extent");
  MIXMOE_REQUIRE_ERROR(
      parse(make_file(R"({"t":{"dtype":"F32","shape":[4294967296,4294967296],"data_offsets":[0,24]}})", 24)),
      "is larger than the data buffer");
  MIXMOE_REQUIRE_ERROR(parse(make_file(R"({"t":{"dtype":"F32","shape":[6],"data_offsets":[24,0]}})", 24)),
                       "end before they begin");
  MIXMOE_REQUIRE_ERROR(parse(make_file(R"({"t":{"dtype":"F32","shape":[6]}})", 24)),
                       "tensor 't': data_offsets must be two non-negative integers");
  MIXMOE_REQUIRE_ERROR(parse(make_file(R"({"t":{"dtype":"F32","shape":[6],"data_offsets":[0,24],"x":1}})", 24)),
                       "tensor 't': unknown field 'x'");
  MIXMOE_REQUIRE_ERROR(parse(make_file("{" + t + "," + t + "}", 24)), "tensor 't' appears twice in the header");
  MIXMOE_REQUIRE_ERROR(parse(make_file(R"({"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},)"
                                       R"("b":{"dtype":"F32","shape":[2],"data_offsets":[4,12]}})",
                                       12)),
                       "tensor 'b' (bytes 4..12) overlaps tensor 'a' (bytes 0..8)");
  MIXMOE_REQUIRE_ERROR(parse(make_file(R"({"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},)"
                                       R"("b":{"dtype":"F32","shape":[2],"data_offsets":[12,20]}})",
                                       20)),
                       "bytes 8..12 of the data buffer belong to no tensor (before tensor 'b')");
  MIXMOE_REQUIRE_ERROR(parse(make_file(R"({"__metadata__":{"k":1}})", 0)), "__metadata__ value of 'k' is not a string");
  // Reading from disk names the path; a missing file too.
  TempDir dir("ckpt_st");
  write_bytes(dir.path / "cut.safetensors", good.substr(0, 20));
  MIXMOE_REQUIRE_ERROR(SafetensorsFile::open(dir.path / "cut.safetensors"), "cut.safetensors: header size");
  MIXMOE_REQUIRE_ERROR(SafetensorsFile::open(dir.path / "none.safetensors"), "none.safetensors: cannot open");
}

// ---- atomic files and digests -------------------------------------------------------------

TEST_CASE("atomic writes replace whole files and leave no temporary behind; SHA-256", "[checkpoint]") {
  TempDir dir("ckpt_atomic");
  const fs::path p = dir.path / "f.bin";
  write_file_atomic(p, "first version");
  REQUIRE(read_file(p) == "first version");
  write_file_atomic(p, std::string(100000, 'x'));
  REQUIRE(read_file(p) == std::string(100000, 'x'));
  REQUIRE(std::distance(fs::directory_iterator(dir.path), fs::directory_iterator()) == 1);
  REQUIRE(atomic_temp_path(p).filename().string() == "f.bin.tmp-" + std::to_string(::getpid()));
  // A failure (the directory does not exist) throws naming the path and leaves nothing.
  MIXMOE_REQUIRE_ERROR(write_file_atomic(dir.path / "no" / "f.bin", "x"), "cannot create");
  REQUIRE(!fs::exists(dir.path / "no"));
  // A rename that cannot happen (the target is a non-empty directory): the temporary file is removed.
  fs::create_directories(dir.path / "d" / "inner");
  MIXMOE_REQUIRE_ERROR(write_file_atomic(dir.path / "d", "x"), "cannot rename");
  REQUIRE(!fs::exists(atomic_temp_path(dir.path / "d")));

  REQUIRE(sha256_hex("") == "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855");
  REQUIRE(sha256_hex("abc") == "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad");
  REQUIRE(sha256_hex("abcdbcdecdefdefgefghfghighijhijkijkljklmklmnlmnomnopnopq") ==
          "248d6a61d20638b8e5c026930c3e6039a33ce45964ff2167f6ecedd419db06c1");
  REQUIRE(sha256_hex(std::string(1000000, 'a')) == "cdc76e5c9914fb9281a1c7e284d73e67f1809a48a497200e046d39ccc7112cd0");
}

// ---- configuration JSON -------------------------------------------------------------------

TEST_CASE("ModelConfig <-> JSON round trip and field-naming errors", "[checkpoint]") {
  ModelConfig c = moe_config(77);
  c.attn_bias = true;
  c.qk_norm = true;
  c.rope_theta = 123456.5;
  c.seed = 18446744073709551615ULL;
  c.moe.mix = GroupMix::fixed;
  c.moe.fixed_mix = {0.25, 0.75};
  c.moe.capacity_factor = 1.25;
  const json j = c;
  const auto back = j.get<ModelConfig>();
  REQUIRE(model_config_to_json(back) == j);
  REQUIRE(back.seed == c.seed);
  REQUIRE(back.qk_norm);
  REQUIRE(back.moe.mix == GroupMix::fixed);
  REQUIRE(back.moe.experts_per_group == std::vector<index_t>{2, 3});
  // Missing fields keep their defaults; wrong types and unknown fields are named.
  REQUIRE(model_config_from_json(json{{"vocab", 100}}).vocab == 100);
  MIXMOE_REQUIRE_ERROR(model_config_from_json(json{{"vocab", "big"}}),
                       "config.vocab: expected an integer, got \"big\"");
  MIXMOE_REQUIRE_ERROR(model_config_from_json(json{{"vocabulary", 1}}), "config: unknown field 'vocabulary'");
  MIXMOE_REQUIRE_ERROR(model_config_from_json(json{{"moe", {{"mix", "best"}}}}),
                       "config.moe.mix: unknown value 'best'");
  MIXMOE_REQUIRE_ERROR(model_config_from_json(json{{"moe", {{"top_k", 1.5}}}}),
                       "config.moe.top_k: expected an integer");
  MIXMOE_REQUIRE_ERROR(model_config_from_json(json{{"d_model", 10}, {"heads", 4}}), "not divisible by heads");
}

// ---- model checkpoints --------------------------------------------------------------------

TEST_CASE("model checkpoint round trip: a mixed-MoE DecoderLM gives identical outputs after loading", "[checkpoint]") {
  TempDir dir("ckpt_model");
  MixLM<float> model(moe_config(1));
  const auto ids = Tensor<Index>::from_indices(std::vector<int>{1, 5, 2, 12, 0, 7, 3, 9}, {2, 4});
  no_grad ng;
  const auto want = model(ids).value();
  const json extra = {{"tokenizer", "spm.model"}, {"languages", {"de", "en"}}};
  const fs::path ck = dir.path / "ckpt";
  save_model(model, ck, "mixmoe-mix-fft", extra);
  for (const char* f : {"model.safetensors", "config.json", "MANIFEST.json"}) REQUIRE(fs::exists(ck / f));
  REQUIRE(!fs::exists(dir.path / "ckpt.old"));

  const auto info = read_model_info(ck);
  REQUIRE(info.model_type == "mixmoe-mix-fft");
  REQUIRE(info.dtype == "F32");
  REQUIRE(info.extra == extra);
  REQUIRE(model_config_to_json(read_model_config(ck)) == model_config_to_json(model.config));
  // The file holds exactly the dotted parameter names.
  const auto f = SafetensorsFile::open(ck / "model.safetensors");
  REQUIRE(f.size() == named_parameters(model).size());
  REQUIRE(f.contains("layers.1.ffn.mt.experts.2.w_gate.weight"));
  REQUIRE(f.contains("layers.0.ffn.router.lm.fourier.weight"));

  ModelConfig other = read_model_config(ck);
  other.seed = 99;  // a different initialisation
  MixLM<float> fresh(other);
  REQUIRE(max_abs_diff(fresh(ids).value(), want) > 1e-3);
  load_model(fresh, ck);
  REQUIRE(bit_equal(fresh(ids).value(), want));
  REQUIRE(same_parameters(model, fresh));

  // The single-file form carries the configuration in the metadata.
  const fs::path file = dir.path / "weights.safetensors";
  save_model(model, file, "mixmoe-mix-fft", extra);
  REQUIRE(read_model_info(file).extra == extra);
  MixLM<float> fresh2(other);
  load_model(fresh2, file);
  REQUIRE(bit_equal(fresh2(ids).value(), want));

  // Saving again replaces the directory as a whole.
  save_model(fresh, ck, "second");
  REQUIRE(read_model_info(ck).model_type == "second");
  REQUIRE(!fs::exists(dir.path / "ckpt.old"));
}

TEST_CASE("loading a model checkpoint checks names, shapes, dtypes and configuration", "[checkpoint]") {
  TempDir dir("ckpt_mismatch");
  MixLM<double> model(moe_config(1));
  const fs::path ck = dir.path / "ck";
  save_model(model, ck, "mix");

  // A different configuration is named field by field.
  ModelConfig wider = moe_config(1);
  wider.moe.expert_hidden = 7;
  wider.rope_theta = 500.0;
  MixLM<double> m2(wider);
  MIXMOE_REQUIRE_ERROR(load_model(m2, ck), "rope_theta: model 500.0, checkpoint 10000.0");
  // Without the configuration check, the shapes are: the first few mismatches are listed.
  MIXMOE_REQUIRE_ERROR(load_model(m2, ck, {.check_config = false}),
                       "30 with a different shape (layers.0.ffn.lm.experts.0.w_gate.weight: file (6, 8), model (7, 8)");
  // Missing and unexpected names: a dense model against the MoE checkpoint.
  ModelConfig dense_cfg = moe_config(1);
  DenseLM<double> dense(dense_cfg);
  MIXMOE_REQUIRE_ERROR(load_model(dense, ck, {.check_config = false}),
                       "6 missing (layers.0.ffn.w_gate.weight, layers.0.ffn.w_up.weight");
  MIXMOE_REQUIRE_ERROR(load_model(dense, ck, {.check_config = false}), "40 unexpected (layers.0.ffn.group_gate.weight");

  // Weights files with one defect each (no manifest: the single-file form).
  auto params = named_parameters(model);
  auto write_variant = [&](const fs::path& p, const std::string& skip, const std::string& as_int,
                           const std::string& reshape) {
    SafetensorsWriter w;
    for (auto& [name, v] : params) {
      if (name == skip) continue;
      if (name == as_int)
        w.add(name, Tensor<std::int32_t>::zeros(v.shape()));
      else if (name == reshape)
        w.add(name, v.value().reshape(Shape{v.numel()}));
      else
        w.add(name, v.value());
    }
    w.write(p);
  };
  MixLM<double> target(moe_config(5));
  write_variant(dir.path / "missing.safetensors", "norm.weight", "", "");
  MIXMOE_REQUIRE_ERROR(load_model(target, dir.path / "missing.safetensors", {.check_config = false}),
                       "missing.safetensors does not match the model: 1 missing (norm.weight)");
  write_variant(dir.path / "dtype.safetensors", "", "embed.weight", "");
  MIXMOE_REQUIRE_ERROR(load_model(target, dir.path / "dtype.safetensors", {.check_config = false}),
                       "tensor 'embed.weight' has dtype I32, which cannot be read as floating point");
  write_variant(dir.path / "shape.safetensors", "", "", "layers.1.attn.wk.weight");
  MIXMOE_REQUIRE_ERROR(load_model(target, dir.path / "shape.safetensors", {.check_config = false}),
                       "1 with a different shape (layers.1.attn.wk.weight: file (32), model (4, 8))");
  const std::string whole = read_file(ck / "model.safetensors");
  write_bytes(dir.path / "cut.safetensors", whole.substr(0, whole.size() / 2));
  MIXMOE_REQUIRE_ERROR(load_model(target, dir.path / "cut.safetensors", {.check_config = false}),
                       "cut.safetensors: tensor");
  // Loading failed before any copy: the target still has its own initialisation.
  REQUIRE(!same_parameters(model, target));
}

// ---- training checkpoints -----------------------------------------------------------------

namespace {

/// A tiny training run on fixed random data; batches are drawn from the generator "data".
struct Run {
  ModelConfig cfg;
  MixLM<float> model;
  AdamW<float> opt;
  Generator data_gen;
  std::vector<Index> data;
  std::vector<float> losses;
  std::int64_t step = 0;

  Run(std::uint64_t model_seed, std::uint64_t data_seed)
      : cfg(moe_config(model_seed)),
        model(cfg),
        opt(trainable_parameters(model), {.lr = 1e-2, .weight_decay = 0.05}),
        data_gen(data_seed) {
    Generator g(42);  // the data set is the same for every run
    for (int i = 0; i < 200; ++i) data.push_back(static_cast<Index>(g.below(13)));
  }

  void train(int steps) {
    const index_t b = 3, t = 6;
    for (int s = 0; s < steps; ++s, ++step) {
      opt.set_lr(1e-2 * (1.0 + static_cast<double>(step)) / 8.0);  // a warm-up schedule
      auto in = Tensor<Index>::empty({b, t}), out = Tensor<Index>::empty({b, t});
      for (index_t i = 0; i < b; ++i) {
        const auto start = static_cast<std::size_t>(data_gen.below(data.size() - static_cast<std::size_t>(t) - 1));
        for (index_t j = 0; j < t; ++j) {
          in(i, j) = data[start + static_cast<std::size_t>(j)];
          out(i, j) = data[start + static_cast<std::size_t>(j) + 1];
        }
      }
      const auto logits = model(in);  // before the auxiliary loss, which reads the routing of this forward
      auto loss = cross_entropy(logits, out) + 0.01 * load_balance_loss(model);
      losses.push_back(loss.item());
      loss.backward();
      opt.step();
      opt.zero_grad();
    }
  }
};

}  // namespace

TEST_CASE("training resume is bit-identical to an uninterrupted run", "[checkpoint]") {
  TempDir dir("ckpt_resume");
  const int total = 8, first = 3;
  Run straight(1, 7);
  straight.train(total);

  Run part(1, 7);
  part.train(first);
  TrainState st;
  st.global_step = part.step;
  st.epoch = 2;
  st.data_position = {{"shard", 3}, {"offset", 12345}};
  st.save_rng("data", part.data_gen);
  st.scheduler = {{"kind", "warmup"}, {"base_lr", 1e-2}};
  st.best_validation = 2.5 + 1e-15;
  st.skipped_steps = 1;
  st.extra = {{"note", "x"}};
  const fs::path ck = dir.path / "train";
  save_training_state(ck, part.model, part.opt, st, "mixmoe-mix-fft");
  for (const char* f :
       {"model.safetensors", "config.json", "optimizer.safetensors", "trainer_state.json", "MANIFEST.json"})
    REQUIRE(fs::exists(ck / f));
  const auto of = SafetensorsFile::open(ck / "optimizer.safetensors");
  REQUIRE(of.contains("adam.m.embed.weight"));
  REQUIRE(of.contains("adam.v.layers.1.ffn.router.mt.base.weight"));

  // Fresh objects with other seeds: everything must come from the checkpoint.
  Run resumed(123, 456);
  const auto back = load_training_state(ck, resumed.model, resumed.opt);
  back.restore_rng("data", resumed.data_gen);
  resumed.step = back.global_step;
  REQUIRE(back.global_step == first);
  REQUIRE(back.epoch == 2);
  REQUIRE(back.data_position == st.data_position);
  REQUIRE(back.scheduler == st.scheduler);
  REQUIRE(back.best_validation.has_value());
  REQUIRE(*back.best_validation == *st.best_validation);
  REQUIRE(back.skipped_steps == 1);
  REQUIRE(back.extra == st.extra);
  REQUIRE(resumed.opt.steps() == first);
  REQUIRE(resumed.opt.options().lr == part.opt.options().lr);
  MIXMOE_REQUIRE_ERROR(back.restore_rng("dropout", resumed.data_gen), "no generator 'dropout'");

  resumed.train(total - first);
  REQUIRE(resumed.losses.size() == static_cast<std::size_t>(total - first));
  for (int i = 0; i < total - first; ++i) {
    INFO("step " << first + i);
    REQUIRE(std::bit_cast<std::uint32_t>(resumed.losses[static_cast<std::size_t>(i)]) ==
            std::bit_cast<std::uint32_t>(straight.losses[static_cast<std::size_t>(first + i)]));
  }
  REQUIRE(same_parameters(straight.model, resumed.model));
  for (std::size_t i = 0; i < straight.opt.first_moments().size(); ++i) {
    REQUIRE(straight.opt.first_moments()[i].defined() == resumed.opt.first_moments()[i].defined());
    if (straight.opt.first_moments()[i].defined())
      REQUIRE(bit_equal(straight.opt.first_moments()[i], resumed.opt.first_moments()[i]));
  }

  // An optimizer built differently is refused by name.
  Run other(1, 7);
  AdamW<float> wrong_beta(trainable_parameters(other.model), {.lr = 1e-2, .beta1 = 0.8, .weight_decay = 0.05});
  MIXMOE_REQUIRE_ERROR(load_training_state(ck, other.model, wrong_beta), "AdamW beta1 is 0.8");
  set_requires_grad(
      other.model, [](std::string_view n) { return n.starts_with("embed"); }, false);
  AdamW<float> fewer(trainable_parameters(other.model), {.lr = 1e-2, .weight_decay = 0.05});
  MIXMOE_REQUIRE_ERROR(load_training_state(ck, other.model, fewer), "1 only in the checkpoint (embed.weight)");
}

TEST_CASE("checkpoint crash safety: a killed save never loses the previous checkpoint", "[checkpoint]") {
  TempDir dir("ckpt_crash");
  const fs::path ck = dir.path / "ck";
  MixLM<float> a(moe_config(1)), b(moe_config(2));
  save_model(a, ck, "a");
  auto loads_as = [&](const fs::path& p, MixLM<float>& expect) {
    MixLM<float> m(moe_config(3));
    load_model(m, p);
    return same_parameters(m, expect);
  };

  SECTION("killed while writing the staging directory") {
    const fs::path stale = dir.path / "ck.tmp-999999999";  // no such process
    fs::create_directories(stale);
    write_bytes(stale / "model.safetensors", "partial");
    write_bytes(ck / "model.safetensors.tmp-4242", "partial");  // a stray temporary inside
    REQUIRE(loads_as(ck, a));
    save_model(b, ck, "b");  // the next save cleans the leftover up
    REQUIRE(!fs::exists(stale));
    REQUIRE(loads_as(ck, b));
  }
  SECTION("killed between moving the old checkpoint aside and moving the new one in") {
    fs::rename(ck, dir.path / "ck.old");
    REQUIRE(open_checkpoint(ck) == dir.path / "ck.old");
    REQUIRE(loads_as(ck, a));
    REQUIRE(read_model_info(ck).model_type == "a");
    save_model(b, ck, "b");
    REQUIRE(!fs::exists(dir.path / "ck.old"));
    REQUIRE(loads_as(ck, b));
  }
  SECTION("killed after the swap, before removing the old one") {
    save_model(b, dir.path / "ck2", "b");
    fs::rename(ck, dir.path / "ck2.old");
    REQUIRE(loads_as(dir.path / "ck2", b));  // the complete new one wins
    save_model(a, dir.path / "ck2", "a");
    REQUIRE(!fs::exists(dir.path / "ck2.old"));
  }
  SECTION("no manifest, a truncated or a corrupted file: clear errors") {
    MixLM<float> m(moe_config(3));
    const std::string bytes = read_file(ck / "model.safetensors");
    write_bytes(ck / "model.safetensors", bytes.substr(0, bytes.size() - 10));
    MIXMOE_REQUIRE_ERROR(load_model(m, ck), "model.safetensors has " + std::to_string(bytes.size() - 10) +
                                                " bytes, the manifest says " + std::to_string(bytes.size()));
    std::string flipped = bytes;
    flipped[bytes.size() - 3] = static_cast<char>(flipped[bytes.size() - 3] ^ 1);
    write_bytes(ck / "model.safetensors", flipped);
    MIXMOE_REQUIRE_ERROR(load_model(m, ck), "model.safetensors does not match its SHA-256");
    fs::remove(ck / "MANIFEST.json");
    MIXMOE_REQUIRE_ERROR(load_model(m, ck), "no MANIFEST.json: the checkpoint was not completed");
    MIXMOE_REQUIRE_ERROR(load_model(m, dir.path / "nothing"), "nothing: no such directory");
  }
  SECTION("a writer that is not committed leaves nothing") {
    {
      CheckpointWriter w(dir.path / "ck3");
      w.add_file("x.txt", "x");
      REQUIRE(fs::exists(w.staging_dir() / "x.txt"));
    }
    REQUIRE(std::distance(fs::directory_iterator(dir.path), fs::directory_iterator()) == 1);  // only ck
  }
}

TEST_CASE("checkpoint JSON readers refuse fields of the wrong type with an Error naming file and field",
          "[checkpoint]") {
  TempDir dir("ckpt_json_types");
  // A checkpoint directory holding exactly these files (valid manifest).
  auto write_ckpt = [&](const std::string& name, const std::map<std::string, std::string>& files) {
    CheckpointWriter w(dir.path / name);
    for (const auto& [f, bytes] : files) w.add_file(f, bytes);
    w.commit();
    return dir.path / name;
  };
  const std::string cfg_ok = R"("config": {"vocab": 13, "d_model": 8, "heads": 2})";

  // config.json: "format", "model_type" and "dtype" of another type (found by fuzz_json_config).
  fs::path ck = write_ckpt("fmt", {{"config.json", R"({"format":{"vye":{}}})"}});
  MIXMOE_REQUIRE_ERROR(read_model_info(ck), "fmt/config.json: field \"format\" must be a string, got object");
  ck = write_ckpt("type", {{"config.json", R"({"format":"mixmoe","model_type":3,)" + cfg_ok + "}"}});
  MIXMOE_REQUIRE_ERROR(read_model_info(ck), "type/config.json: field \"model_type\" must be a string, got number");
  ck = write_ckpt("dtype", {{"config.json", R"({"format":"mixmoe","dtype":["F32"],)" + cfg_ok + "}"}});
  MIXMOE_REQUIRE_ERROR(read_model_info(ck), "dtype/config.json: field \"dtype\" must be a string, got array");
  ck = write_ckpt("ver", {{"config.json", R"({"format":"mixmoe","format_version":"1",)" + cfg_ok + "}"}});
  MIXMOE_REQUIRE_ERROR(read_model_info(ck), "field \"format_version\" must be an integer, got string");
  ck = write_ckpt("ver2", {{"config.json", R"({"format":"mixmoe","format_version":2,)" + cfg_ok + "}"}});
  MIXMOE_REQUIRE_ERROR(read_model_info(ck),
                       "ver2/config.json: unsupported format_version 2 (this version reads up to 1)");
  MIXMOE_REQUIRE_ERROR(detail::model_info_from_json(json::array(), "c.json"),
                       "c.json: not a mixmoe model configuration (expected a JSON object, got array)");
  // The same fields, well typed, read.
  ck = write_ckpt("good", {{"config.json", R"({"format":"mixmoe","format_version":1,"model_type":"m","dtype":"F64",)" +
                                               cfg_ok + R"(,"extra":[1]})"}});
  const ModelInfo info = read_model_info(ck);
  CHECK(info.model_type == "m");
  CHECK(info.dtype == "F64");
  CHECK(info.config.vocab == 13);
  CHECK(info.extra == json::array({1}));

  // MANIFEST.json: "format" a number (found by fuzzing), and other malformed manifests. open_checkpoint
  // names the directory and the problem; load_model goes through it.
  auto with_manifest = [&](const std::string& name, const std::string& manifest) {
    const fs::path d = dir.path / name;
    fs::create_directories(d);
    write_bytes(d / "MANIFEST.json", manifest);
    return d;
  };
  ck = with_manifest("m1", R"({"format":1,"files":{}})");
  MIXMOE_REQUIRE_ERROR(open_checkpoint(ck), "m1: MANIFEST.json: field \"format\" must be a string, got number");
  MixLM<double> model(moe_config(1));
  MIXMOE_REQUIRE_ERROR(load_model(model, ck), "MANIFEST.json: field \"format\" must be a string, got number");
  MIXMOE_REQUIRE_ERROR(load_model(model, with_manifest("m2", "[1]")),
                       "MANIFEST.json: expected a JSON object, got array");
  ck = with_manifest("m3", R"({"format":"mixmoe-checkpoint","format_version":1,"files":[]})");
  MIXMOE_REQUIRE_ERROR(open_checkpoint(ck), "m3: MANIFEST.json: field \"files\" must be an object, got array");
  ck = with_manifest("m4", R"({"format":"mixmoe-checkpoint","format_version":18446744073709551615,"files":{}})");
  MIXMOE_REQUIRE_ERROR(open_checkpoint(ck), "MANIFEST.json: unsupported format_version 18446744073709551615");
  ck = with_manifest("m5", R"({"format":"mixmoe-checkpoint","format_version":1.0,"files":{}})");
  MIXMOE_REQUIRE_ERROR(open_checkpoint(ck), "field \"format_version\" must be an integer, got number");
  ck = with_manifest("m6", R"({"format":"mixmoe-checkpoint","files":{}})");
  MIXMOE_REQUIRE_ERROR(open_checkpoint(ck), "MANIFEST.json: field \"format_version\" missing");
  // A listed name is a file of the directory, never a path out of it (here: one that would match).
  write_bytes(dir.path / "outside", "secret");
  auto listing = [&](const std::string& name) {
    return json{{"format", "mixmoe-checkpoint"},
                {"format_version", 1},
                {"files", {{name, {{"size", 6}, {"sha256", sha256_hex("secret")}}}}}}
        .dump();
  };
  MIXMOE_REQUIRE_ERROR(open_checkpoint(with_manifest("m7", listing("../outside"))),
                       "m7: MANIFEST.json: invalid file name \"../outside\"");
  const std::string absolute = fs::absolute(dir.path / "outside").string();
  MIXMOE_REQUIRE_ERROR(open_checkpoint(with_manifest("m8", listing(absolute))),
                       "m8: MANIFEST.json: invalid file name \"" + absolute + "\"");
  with_manifest("m9", listing("inside"));  // the same listing of a file inside is a checkpoint
  write_bytes(dir.path / "m9" / "inside", "secret");
  CHECK(open_checkpoint(dir.path / "m9") == dir.path / "m9");
  // A malformed manifest is a problem like any other: the complete "<dir>.old" is still found.
  save_model(model, dir.path / "m1.old", "mix");
  CHECK(open_checkpoint(dir.path / "m1") == dir.path / "m1.old");

  // trainer_state.json's state (found by fuzz_trainer_state: best_validation a number).
  const std::string where = "t/trainer_state.json: state";
  MIXMOE_REQUIRE_ERROR(
      train_state_from_json(json::parse(R"({"global_step":0,"epoch":0,"skipped_steps":0,"best_validation":1})"), where),
      "t/trainer_state.json: state: field \"best_validation\" must be an object ({\"value\", \"bits\"}) or null, got "
      "number");
  MIXMOE_REQUIRE_ERROR(train_state_from_json(json::parse(R"({"global_step":"3","epoch":0,"skipped_steps":0})"), where),
                       "state: field \"global_step\" must be an integer, got string");
  MIXMOE_REQUIRE_ERROR(train_state_from_json(json::parse(R"({"global_step":0,"skipped_steps":0})"), where),
                       "state: field \"epoch\" missing");
  MIXMOE_REQUIRE_ERROR(
      train_state_from_json(json::parse(R"({"global_step":9223372036854775808,"epoch":0,"skipped_steps":0})"), where),
      "state: field \"global_step\" is out of range: 9223372036854775808");
  MIXMOE_REQUIRE_ERROR(train_state_from_json(
                           json::parse(R"({"global_step":0,"epoch":0,"skipped_steps":0,"best_validation":{}})"), where),
                       "state: best_validation: field \"bits\" missing");
  MIXMOE_REQUIRE_ERROR(
      train_state_from_json(json::parse(R"({"global_step":0,"epoch":0,"skipped_steps":0,"rng":5})"), where),
      "state: field \"rng\" must be an object, got number");
  MIXMOE_REQUIRE_ERROR(train_state_from_json(json(7), where),
                       "state: the training state is not an object (got number)");
  // Well typed: read, including a best score of -1.5 from its bits (4007... is 3.0, bff8... is -1.5).
  const TrainState s = train_state_from_json(
      json::parse(R"({"global_step":9223372036854775807,"epoch":2,"skipped_steps":1,"data_position":[3],)"
                  R"("best_validation":{"value":0,"bits":"bff8000000000000"}})"),
      where);
  CHECK(s.global_step == std::numeric_limits<std::int64_t>::max());
  CHECK(s.epoch == 2);
  CHECK(s.skipped_steps == 1);
  CHECK(s.data_position == json::array({3}));
  REQUIRE(s.best_validation.has_value());
  CHECK(*s.best_validation == -1.5);

  // load_training_state: the optimizer object of trainer_state.json, damaged by hand.
  Run run(1, 7);
  save_training_state(dir.path / "train", run.model, run.opt, TrainState{});
  std::map<std::string, std::string> files;
  for (const char* f : {"model.safetensors", "config.json", "optimizer.safetensors", "trainer_state.json"})
    files[f] = read_file(dir.path / "train" / f);
  const json trainer = json::parse(files["trainer_state.json"]);
  auto damaged = [&](const std::string& name, const json::json_pointer& field, const json& value) {
    json t = trainer;
    t[field] = value;
    auto fs2 = files;
    fs2["trainer_state.json"] = t.dump();
    return write_ckpt(name, fs2);
  };
  Run other(2, 8);
  MIXMOE_REQUIRE_ERROR(
      load_training_state(damaged("o1", json::json_pointer("/optimizer/type"), 5), other.model, other.opt),
      "o1/trainer_state.json: optimizer: field \"type\" must be a string, got number");
  MIXMOE_REQUIRE_ERROR(
      load_training_state(damaged("o2", json::json_pointer("/optimizer/parameters"), "all"), other.model, other.opt),
      "o2/trainer_state.json: optimizer: field \"parameters\" must be an array of names, got string");
  MIXMOE_REQUIRE_ERROR(
      load_training_state(damaged("o3", json::json_pointer("/optimizer/parameters/0"), 1), other.model, other.opt),
      "optimizer: field \"parameters\" must hold names, got number 1");
  MIXMOE_REQUIRE_ERROR(
      load_training_state(damaged("o4", json::json_pointer("/format_version"), 2), other.model, other.opt),
      "o4/trainer_state.json: unsupported format_version 2");
  MIXMOE_REQUIRE_ERROR(
      load_training_state(damaged("o5", json::json_pointer("/state/best_validation"), true), other.model, other.opt),
      "o5/trainer_state.json: state: field \"best_validation\" must be an object");
  // Undamaged, it loads.
  CHECK(load_training_state(write_ckpt("o6", files), other.model, other.opt).global_step == 0);
}

// ---- HF LLaMA / Qwen2 import --------------------------------------------------------------

namespace {

/// Raw HF-layout weights and a naive forward over them (plain loops, double).
struct HfModel {
  index_t vocab = 17, hidden = 16, inter = 24, layers = 2, heads = 4, kv_heads = 2;
  double eps = 1e-5, theta = 5000.0;
  bool qwen2 = false, tied = false;
  std::map<std::string, std::vector<double>> w;
  std::map<std::string, Shape> shapes;

  void make(std::uint64_t seed, Dtype stored) {
    Generator g(seed);
    const index_t dh = hidden / heads;
    auto add = [&](const std::string& name, Shape s, double mean, double std) {
      std::vector<double> v(static_cast<std::size_t>(s.numel()));
      for (auto& x : v) {
        const auto f = static_cast<float>(g.normal(mean, std));  // the values the file can hold exactly
        x = stored == Dtype::BF16 ? bf16_to_float(float_to_bf16(f)) : f;
      }
      w[name] = v;
      shapes[name] = s;
    };
    add("model.embed_tokens.weight", {vocab, hidden}, 0, 0.5);
    for (index_t i = 0; i < layers; ++i) {
      const std::string p = "model.layers." + std::to_string(i) + ".";
      add(p + "input_layernorm.weight", {hidden}, 1, 0.2);
      add(p + "post_attention_layernorm.weight", {hidden}, 1, 0.2);
      add(p + "self_attn.q_proj.weight", {heads * dh, hidden}, 0, 0.3);
      add(p + "self_attn.k_proj.weight", {kv_heads * dh, hidden}, 0, 0.3);
      add(p + "self_attn.v_proj.weight", {kv_heads * dh, hidden}, 0, 0.3);
      add(p + "self_attn.o_proj.weight", {hidden, heads * dh}, 0, 0.3);
      if (qwen2) {
        add(p + "self_attn.q_proj.bias", {heads * dh}, 0, 0.3);
        add(p + "self_attn.k_proj.bias", {kv_heads * dh}, 0, 0.3);
        add(p + "self_attn.v_proj.bias", {kv_heads * dh}, 0, 0.3);
      }
      add(p + "mlp.gate_proj.weight", {inter, hidden}, 0, 0.3);
      add(p + "mlp.up_proj.weight", {inter, hidden}, 0, 0.3);
      add(p + "mlp.down_proj.weight", {hidden, inter}, 0, 0.3);
    }
    add("model.norm.weight", {hidden}, 1, 0.2);
    if (!tied) add("lm_head.weight", {vocab, hidden}, 0, 0.3);
  }

  json config() const {
    return {{"architectures", {qwen2 ? "Qwen2ForCausalLM" : "LlamaForCausalLM"}},
            {"model_type", qwen2 ? "qwen2" : "llama"},
            {"hidden_size", hidden},
            {"intermediate_size", inter},
            {"num_hidden_layers", layers},
            {"num_attention_heads", heads},
            {"num_key_value_heads", kv_heads},
            {"vocab_size", vocab},
            {"rms_norm_eps", eps},
            {"rope_theta", theta},
            {"hidden_act", "silu"},
            {"max_position_embeddings", 64},
            {"rope_scaling", nullptr},
            {"tie_word_embeddings", tied},
            {"torch_dtype", "bfloat16"}};
  }

  /// Writes config.json and the weights (in `shards` files with an index when > 1).
  void save(const fs::path& dir, Dtype stored, int shards = 1, const std::string& skip = "") const {
    fs::create_directories(dir);
    write_file_atomic(dir / "config.json", config().dump(2));
    std::vector<SafetensorsWriter> ws(static_cast<std::size_t>(shards));
    json weight_map = json::object();
    std::size_t k = 0;
    for (const auto& [name, v] : w) {
      if (name == skip) continue;
      const std::size_t s = k++ % ws.size();
      ws[s].add(name, Tensor<double>::from(v, shapes.at(name)), stored);
      weight_map[name] = "model-0000" + std::to_string(s + 1) + "-of-0000" + std::to_string(shards) + ".safetensors";
    }
    if (shards == 1) {
      ws[0].set_metadata("format", "pt");
      ws[0].write(dir / "model.safetensors");
      return;
    }
    for (std::size_t s = 0; s < ws.size(); ++s)
      ws[s].write(dir / ("model-0000" + std::to_string(s + 1) + "-of-0000" + std::to_string(shards) + ".safetensors"));
    write_file_atomic(dir / "model.safetensors.index.json",
                      json{{"metadata", {{"total_size", 0}}}, {"weight_map", weight_map}}.dump());
  }

  const double* at(const std::string& name) const { return w.at(name).data(); }

  // y (n, out) = x (n, in) W^T (+ b)
  static std::vector<double> lin(const std::vector<double>& x, index_t n, index_t in, const double* W, index_t out,
                                 const double* b) {
    std::vector<double> y(static_cast<std::size_t>(n * out));
    for (index_t r = 0; r < n; ++r)
      for (index_t o = 0; o < out; ++o) {
        double s = b ? b[o] : 0.0;
        for (index_t i = 0; i < in; ++i) s += x[static_cast<std::size_t>(r * in + i)] * W[o * in + i];
        y[static_cast<std::size_t>(r * out + o)] = s;
      }
    return y;
  }

  std::vector<double> rms(const std::vector<double>& x, index_t n, const double* wt) const {
    std::vector<double> y(x.size());
    for (index_t r = 0; r < n; ++r) {
      double ms = 0;
      for (index_t c = 0; c < hidden; ++c)
        ms += x[static_cast<std::size_t>(r * hidden + c)] * x[static_cast<std::size_t>(r * hidden + c)];
      const double inv = 1.0 / std::sqrt(ms / static_cast<double>(hidden) + eps);
      for (index_t c = 0; c < hidden; ++c)
        y[static_cast<std::size_t>(r * hidden + c)] = x[static_cast<std::size_t>(r * hidden + c)] * inv * wt[c];
    }
    return y;
  }

  // rotate_half RoPE on rows (T, nh * dh) in place: pair (i, i + dh/2) of token t turned by t * theta^(-2i/dh).
  void rope(std::vector<double>& x, index_t t_len, index_t nh) const {
    const index_t dh = hidden / heads, half = dh / 2;
    for (index_t t = 0; t < t_len; ++t)
      for (index_t h = 0; h < nh; ++h)
        for (index_t i = 0; i < half; ++i) {
          const double a =
              static_cast<double>(t) * std::pow(theta, -2.0 * static_cast<double>(i) / static_cast<double>(dh));
          double& x1 = x[static_cast<std::size_t>(t * nh * dh + h * dh + i)];
          double& x2 = x[static_cast<std::size_t>(t * nh * dh + h * dh + i + half)];
          const double r1 = x1 * std::cos(a) - x2 * std::sin(a), r2 = x2 * std::cos(a) + x1 * std::sin(a);
          x1 = r1;
          x2 = r2;
        }
  }

  /// Logits (T, vocab) of one sequence.
  std::vector<double> forward(const std::vector<int>& ids) const {
    const auto T = static_cast<index_t>(ids.size());
    const index_t dh = hidden / heads, rep = heads / kv_heads;
    std::vector<double> x(static_cast<std::size_t>(T * hidden));
    for (index_t t = 0; t < T; ++t)
      for (index_t c = 0; c < hidden; ++c)
        x[static_cast<std::size_t>(t * hidden + c)] =
            at("model.embed_tokens.weight")[ids[static_cast<std::size_t>(t)] * hidden + c];
    for (index_t l = 0; l < layers; ++l) {
      const std::string p = "model.layers." + std::to_string(l) + ".";
      auto bias = [&](const char* n) { return qwen2 ? at(p + "self_attn." + n + "_proj.bias") : nullptr; };
      const auto h = rms(x, T, at(p + "input_layernorm.weight"));
      auto q = lin(h, T, hidden, at(p + "self_attn.q_proj.weight"), heads * dh, bias("q"));
      auto k = lin(h, T, hidden, at(p + "self_attn.k_proj.weight"), kv_heads * dh, bias("k"));
      const auto v = lin(h, T, hidden, at(p + "self_attn.v_proj.weight"), kv_heads * dh, bias("v"));
      rope(q, T, heads);
      rope(k, T, kv_heads);
      std::vector<double> o(static_cast<std::size_t>(T * heads * dh), 0.0);
      for (index_t hh = 0; hh < heads; ++hh) {
        const index_t kh = hh / rep;  // HF repeat_kv
        for (index_t t = 0; t < T; ++t) {
          std::vector<double> s(static_cast<std::size_t>(t + 1));
          double mx = -INFINITY;
          for (index_t j = 0; j <= t; ++j) {
            double d = 0;
            for (index_t i = 0; i < dh; ++i)
              d += q[static_cast<std::size_t>(t * heads * dh + hh * dh + i)] *
                   k[static_cast<std::size_t>(j * kv_heads * dh + kh * dh + i)];
            s[static_cast<std::size_t>(j)] = d / std::sqrt(static_cast<double>(dh));
            mx = std::max(mx, s[static_cast<std::size_t>(j)]);
          }
          double z = 0;
          for (auto& e : s) z += (e = std::exp(e - mx));
          for (index_t j = 0; j <= t; ++j)
            for (index_t i = 0; i < dh; ++i)
              o[static_cast<std::size_t>(t * heads * dh + hh * dh + i)] +=
                  s[static_cast<std::size_t>(j)] / z * v[static_cast<std::size_t>(j * kv_heads * dh + kh * dh + i)];
        }
      }
      const auto ao = lin(o, T, heads * dh, at(p + "self_attn.o_proj.weight"), hidden, nullptr);
      for (std::size_t i = 0; i < x.size(); ++i) x[i] += ao[i];
      const auto h2 = rms(x, T, at(p + "post_attention_layernorm.weight"));
      const auto gt = lin(h2, T, hidden, at(p + "mlp.gate_proj.weight"), inter, nullptr);
      auto up = lin(h2, T, hidden, at(p + "mlp.up_proj.weight"), inter, nullptr);
      for (std::size_t i = 0; i < up.size(); ++i) up[i] *= gt[i] / (1.0 + std::exp(-gt[i]));
      const auto dn = lin(up, T, inter, at(p + "mlp.down_proj.weight"), hidden, nullptr);
      for (std::size_t i = 0; i < x.size(); ++i) x[i] += dn[i];
    }
    const auto hf = rms(x, T, at("model.norm.weight"));
    return lin(hf, T, hidden, at(tied ? "model.embed_tokens.weight" : "lm_head.weight"), vocab, nullptr);
  }
};

double max_diff_to_reference(const HfModel& ref, DenseLM<double>& model, const std::vector<int>& ids) {
  no_grad ng;
  const auto logits =
      model(Tensor<Index>::from_indices(ids, {1, static_cast<index_t>(ids.size())})).value().to_vector();
  const auto want = ref.forward(ids);
  REQUIRE(logits.size() == want.size());
  double m = 0;
  for (std::size_t i = 0; i < want.size(); ++i) m = std::max(m, std::abs(logits[i] - want[i]));
  return m;
}

}  // namespace

TEST_CASE("HF import: a LLaMA checkpoint (GQA, sharded) matches a naive reference forward", "[checkpoint][hf]") {
  TempDir dir("ckpt_llama");
  HfModel ref;
  ref.make(11, Dtype::F32);
  ref.save(dir.path / "one", Dtype::F32);
  ref.save(dir.path / "sharded", Dtype::F32, 3);
  const std::vector<int> ids{3, 16, 0, 7, 7, 2, 9};
  for (const char* sub : {"one", "sharded"}) {
    INFO(sub);
    const ModelConfig cfg = hf_config(dir.path / sub);
    REQUIRE(cfg.d_model == 16);
    REQUIRE(cfg.kv_heads == 2);
    REQUIRE(cfg.d_ff == 24);
    REQUIRE(cfg.rope_theta == 5000.0);
    REQUIRE(cfg.norm_eps == 1e-5);
    REQUIRE(!cfg.tie_embeddings);
    REQUIRE(!cfg.attn_bias);
    DenseLM<double> model(cfg);
    REQUIRE(max_diff_to_reference(ref, model, ids) > 1e-2);  // random init is far off
    load_hf_dense(model, dir.path / sub);
    const double d = max_diff_to_reference(ref, model, ids);
    INFO("max |logit difference| " << d);
    REQUIRE(d < 1e-10);
  }
  // A float model loads the same file (converted), within float precision.
  DenseLM<float> mf(hf_config(dir.path / "one"));
  load_hf_dense(mf, dir.path / "one");
  REQUIRE(static_cast<double>(mf.embed.weight.value().to_vector()[5]) == ref.w.at("model.embed_tokens.weight")[5]);

  // Errors name the tensor, the shape, the model type.
  DenseLM<double> model(hf_config(dir.path / "one"));
  ref.save(dir.path / "missing", Dtype::F32, 1, "model.layers.1.mlp.up_proj.weight");
  MIXMOE_REQUIRE_ERROR(load_hf_dense(model, dir.path / "missing"),
                       "1 tensor(s) missing: model.layers.1.mlp.up_proj.weight");
  HfModel wrong = ref;
  wrong.w["model.layers.0.self_attn.k_proj.weight"].resize(16 * 16);
  wrong.shapes["model.layers.0.self_attn.k_proj.weight"] = Shape{16, 16};
  wrong.save(dir.path / "shape", Dtype::F32);
  MIXMOE_REQUIRE_ERROR(load_hf_dense(model, dir.path / "shape"),
                       "tensor 'model.layers.0.self_attn.k_proj.weight' has shape (16, 16), expected (8, 16)");
  HfModel extra = ref;
  extra.w["model.layers.2.mlp.up_proj.weight"] = {1.0};
  extra.shapes["model.layers.2.mlp.up_proj.weight"] = Shape{1};
  extra.w["model.layers.0.self_attn.rotary_emb.inv_freq"] = {1.0, 0.5};  // ignored
  extra.shapes["model.layers.0.self_attn.rotary_emb.inv_freq"] = Shape{2};
  extra.save(dir.path / "extra", Dtype::F32);
  MIXMOE_REQUIRE_ERROR(load_hf_dense(model, dir.path / "extra"),
                       "unexpected tensor 'model.layers.2.mlp.up_proj.weight'");

  json cfg = ref.config();
  auto with_config = [&](const json& j) {
    write_file_atomic(dir.path / "one" / "config.json", j.dump());
    return hf_config(dir.path / "one");
  };
  cfg["model_type"] = "mistral";
  MIXMOE_REQUIRE_ERROR(with_config(cfg), "unsupported model_type 'mistral' (supported: llama, qwen2)");
  cfg = ref.config();
  cfg["rope_scaling"] = {{"rope_type", "llama3"}, {"factor", 8.0}};
  MIXMOE_REQUIRE_ERROR(with_config(cfg), "rope_scaling {\"factor\":8.0,\"rope_type\":\"llama3\"} is not supported");
  cfg = ref.config();
  cfg.erase("hidden_size");
  MIXMOE_REQUIRE_ERROR(with_config(cfg), "config.json: missing 'hidden_size'");
  cfg = ref.config();
  cfg["num_key_value_heads"] = 3;
  MIXMOE_REQUIRE_ERROR(with_config(cfg), "heads 4 is not divisible by kv_heads 3");
  // Fields of another JSON type are named, not left to a json exception.
  cfg = ref.config();
  cfg["model_type"] = 7;
  MIXMOE_REQUIRE_ERROR(with_config(cfg), "config.json: 'model_type' must be a string, got 7");
  cfg = ref.config();
  cfg["hidden_act"] = json::array({"silu"});
  MIXMOE_REQUIRE_ERROR(with_config(cfg), "config.json: 'hidden_act' must be a string, got [\"silu\"]");
}

TEST_CASE("HF import: a Qwen2 checkpoint (q/k/v biases, tied embeddings, BF16) matches the reference",
          "[checkpoint][hf]") {
  TempDir dir("ckpt_qwen2");
  HfModel ref;
  ref.qwen2 = true;
  ref.tied = true;
  ref.kv_heads = 1;
  ref.theta = 1e6;
  ref.make(12, Dtype::BF16);
  ref.save(dir.path / "q", Dtype::BF16);
  const ModelConfig cfg = hf_config(dir.path / "q");
  REQUIRE(cfg.attn_bias);
  REQUIRE(cfg.tie_embeddings);
  DenseLM<double> model(cfg);
  load_hf_dense(model, dir.path / "q");
  const double d = max_diff_to_reference(ref, model, {1, 2, 3, 4, 5, 16});
  INFO("max |logit difference| " << d);
  REQUIRE(d < 1e-10);
  REQUIRE(model.blocks[1].attn.wk.bias.value().to_vector()[3] == ref.w.at("model.layers.1.self_attn.k_proj.bias")[3]);
  // A qwen2 checkpoint without its biases is refused, naming one.
  ref.save(dir.path / "nobias", Dtype::BF16, 1, "model.layers.0.self_attn.v_proj.bias");
  MIXMOE_REQUIRE_ERROR(load_hf_dense(model, dir.path / "nobias"), "missing: model.layers.0.self_attn.v_proj.bias");
}
}  // namespace test_checkpoint
