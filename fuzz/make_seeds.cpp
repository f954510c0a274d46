// Writes the seed inputs of the fuzz targets that the library itself can produce: small valid
// safetensors files (every dtype, metadata, no tensors), model configurations, training states and
// checkpoint manifests.
// Usage: make_seeds SEED_DIR (writes SEED_DIR/fuzz_safetensors, fuzz_json_config, fuzz_trainer_state,
// fuzz_manifest).
#include <mixmoe/io/json_config.hpp>
#include <mixmoe/io/safetensors.hpp>
#include <mixmoe/train/checkpoint.hpp>

#include <cstdio>
#include <filesystem>
#include <fstream>
#include <string>

using namespace mixmoe;

namespace {
void save(const std::filesystem::path& path, const std::string& bytes) {
  std::ofstream out(path, std::ios::binary | std::ios::trunc);
  out << bytes;
  if (!out) throw Error("[make_seeds] cannot write " + path.string());
}
}  // namespace

int main(int argc, char** argv) {
  if (argc != 2) {
    std::fprintf(stderr, "usage: %s OUT_DIR\n", argv[0]);
    return 2;
  }
  const std::filesystem::path seeds = argv[1];
  const std::filesystem::path dir = seeds / "fuzz_safetensors";
  std::filesystem::create_directories(dir);

  SafetensorsWriter all;
  all.add("w.f32", Tensor<float>::from({1, -2, 0.5f, 3, 0, -0.25f}, {2, 3}));
  all.add("w.f64", Tensor<double>::scalar(3.5));
  all.add("w.bf16", Tensor<float>::from({1, 2, 3, 4}, {4}), Dtype::BF16);
  all.add("w.f16", Tensor<float>::from({0.5f, -1}, {1, 2}), Dtype::F16);
  all.add("ids.i32", Tensor<std::int32_t>::from({7, 8, 9}, {3}));
  all.add("ids.i64", Tensor<std::int64_t>::from({-1, 1 << 20}, {2, 1}));
  all.add("empty", Tensor<float>::zeros({0, 4}));
  all.set_metadata("format", "pt");
  save(dir / "all_dtypes.safetensors", all.serialize());

  SafetensorsWriter one;
  one.add("layers.0.ffn.w_up", Tensor<float>::from({0.25f, 0.5f}, {2}));
  save(dir / "one.safetensors", one.serialize());

  save(dir / "no_tensors.safetensors", SafetensorsWriter().serialize());

  const auto cfg_dir = seeds / "fuzz_json_config";
  std::filesystem::create_directories(cfg_dir);
  ModelConfig dense;
  save(cfg_dir / "default.json", model_config_to_json(dense).dump(2));
  ModelConfig moe;
  moe.vocab = 512;
  moe.d_model = 64;
  moe.kv_heads = 2;
  moe.moe.experts_per_group = {4, 2};
  moe.moe.mix = GroupMix::fixed;
  moe.moe.fixed_mix = {0.75, 0.25};
  moe.moe.capacity_factor = 1.25;
  save(cfg_dir / "mixed_moe.json", model_config_to_json(moe).dump());
  save(cfg_dir / "checkpoint_config.json",
       detail::model_info_json(moe, "DecoderLM", "F32", nlohmann::json{{"note", "seed"}}).dump(1));

  const auto state_dir = seeds / "fuzz_trainer_state";
  std::filesystem::create_directories(state_dir);
  TrainState st;
  st.global_step = 1200;
  st.epoch = 3;
  st.data_position = {{"shard", 2}, {"offset", 4096}};
  Generator data_order(42);
  (void)data_order.normal(0.0, 1.0);  // leaves a spare normal value in the state
  st.save_rng("data", data_order);
  st.save_rng("dropout", Generator(7));
  st.scheduler = {{"type", "WarmupCosine"}, {"peak_lr", 3e-4}};
  st.best_validation = 2.375;
  st.skipped_steps = 2;
  save(state_dir / "state.json", train_state_to_json(st).dump());
  save(state_dir / "empty_state.json", train_state_to_json(TrainState{}).dump());

  // fuzz_manifest: the manifest of a directory holding "a.bin" ("hello"), as CheckpointWriter writes it.
  const auto manifest_dir = seeds / "fuzz_manifest";
  std::filesystem::create_directories(manifest_dir);
  const nlohmann::json entry = {{"size", 5}, {"sha256", sha256_hex("hello")}};
  save(manifest_dir / "one_file.json",
       nlohmann::json{
           {"format", "mixmoe-checkpoint"}, {"format_version", kCheckpointFormatVersion}, {"files", {{"a.bin", entry}}}}
           .dump(2));
  save(manifest_dir / "no_files.json", nlohmann::json{{"format", "mixmoe-checkpoint"},
                                                      {"format_version", kCheckpointFormatVersion},
                                                      {"files", nlohmann::json::object()}}
                                           .dump());

  std::printf("make_seeds: seeds in %s\n", seeds.string().c_str());
  return 0;
}
