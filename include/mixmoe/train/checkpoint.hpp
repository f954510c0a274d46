// Checkpoints: a model's weights and configuration, and the full state of a training run
// (model, AdamW moments and step count, named RNG states, data position, ...), such that a
// resumed run is bit-identical to an uninterrupted one.
//
// A checkpoint is a directory:
//   model.safetensors      every named parameter under its dotted name ("layers.0.attn.wq.weight"),
//                          in the model's own dtype (F32 or F64): values round-trip exactly
//   config.json            {"format": "mixmoe", "format_version": 1, "model_type": ..., "dtype": ...,
//                           "config": ModelConfig (io/json_config.hpp), "extra": caller's JSON}
//   optimizer.safetensors  training only: "adam.m.<name>", "adam.v.<name>" (absent while undefined)
//   trainer_state.json     training only: TrainState and the optimizer's step count and options
//   MANIFEST.json          written last: every file above with its size and SHA-256
// The directory is built as "<dir>.tmp-<pid>" (each file synced), then swapped in with
// replace_directory() (io/atomic_file.hpp): dir -> "<dir>.old", staged -> dir, "<dir>.old" removed.
// Opening (open_checkpoint) requires a manifest whose files all exist with the listed size and
// digest; when dir is missing or incomplete but "<dir>.old" is complete (a crash between the two
// renames), that one is used. So a kill at any moment leaves the previous complete checkpoint
// loadable, and a half-written one is never taken for a checkpoint.
//
// save_model/load_model also accept a single "*.safetensors" file: the weights, with the
// configuration in its metadata ("mixmoe.config", "mixmoe.model_type", "mixmoe.extra").
//
// A model (and AdamW) on a device is saved through host copies of its tensors (to_device<Cpu>),
// one tensor at a time, and loaded by reading the file on the host and copying each tensor into
// the device parameter: the files are the same as a Cpu model's, and either device loads them.
#pragma once

#include <algorithm>
#include <bit>
#include <cerrno>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <filesystem>
#include <iterator>
#include <limits>
#include <map>
#include <optional>
#include <sstream>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include <signal.h>
#include <unistd.h>
#include <nlohmann/json.hpp>

#include "mixmoe/core/error.hpp"
#include "mixmoe/core/random.hpp"
#include "mixmoe/io/atomic_file.hpp"
#include "mixmoe/io/json_config.hpp"
#include "mixmoe/io/safetensors.hpp"
#include "mixmoe/nn/config.hpp"
#include "mixmoe/nn/module.hpp"
#include "mixmoe/train/optimizer.hpp"

namespace mixmoe {

inline constexpr const char* kCheckpointManifest = "MANIFEST.json";
inline constexpr int kCheckpointFormatVersion = 1;

// ---- the checkpoint directory ------------------------------------------------------------

/// Builds a checkpoint directory in "<dir>.tmp-<pid>" and swaps it into place on commit().
/// Without commit() (an exception on the way) the staging directory is removed.
class CheckpointWriter {
 public:
  explicit CheckpointWriter(std::filesystem::path dir) : dir_(std::move(dir)) {
    namespace fs = std::filesystem;
    MIXMOE_CHECK(!dir_.empty(), "checkpoint", "empty checkpoint path");
    if (dir_.filename().empty()) dir_ = dir_.parent_path();  // "ckpt/" -> "ckpt"
    remove_stale_staging();
    staging_ = fs::path(dir_.string() + ".tmp-" + std::to_string(static_cast<long long>(::getpid())));
    std::error_code ec;
    fs::remove_all(staging_, ec);
    fs::create_directories(staging_, ec);
    MIXMOE_CHECK(!ec, "checkpoint", staging_.string(), ": cannot create the staging directory: ", ec.message());
  }
  CheckpointWriter(const CheckpointWriter&) = delete;
  CheckpointWriter& operator=(const CheckpointWriter&) = delete;
  ~CheckpointWriter() {
    if (!committed_) {
      std::error_code ec;
      std::filesystem::remove_all(staging_, ec);
    }
  }

  [[nodiscard]] const std::filesystem::path& staging_dir() const { return staging_; }

  /// Writes one file of the checkpoint (synced) and records its size and digest.
  void add_file(const std::string& name, std::string_view bytes) {
    MIXMOE_CHECK(name != kCheckpointManifest && name.find('/') == std::string::npos && !files_.contains(name),
                 "checkpoint", "invalid or repeated file name '", name, "'");
    write_file_synced(staging_ / name, bytes);
    files_[name] = {{"size", bytes.size()}, {"sha256", sha256_hex(bytes)}};
  }

  /// Writes the manifest and moves the directory into place.
  void commit() {
    MIXMOE_CHECK(!committed_, "checkpoint", dir_.string(), ": committed twice");
    const nlohmann::json manifest = {
        {"format", "mixmoe-checkpoint"}, {"format_version", kCheckpointFormatVersion}, {"files", files_}};
    write_file_synced(staging_ / kCheckpointManifest, manifest.dump(2) + "\n");
    replace_directory(staging_, dir_);
    committed_ = true;
  }

 private:
  // Staging directories of processes that no longer run are leftovers of crashes.
  void remove_stale_staging() const {
    namespace fs = std::filesystem;
    std::error_code ec;
    const fs::path parent = detail::parent_or_dot(dir_);
    const std::string prefix = dir_.filename().string() + ".tmp-";
    for (fs::directory_iterator it(parent, ec), end; !ec && it != end; it.increment(ec)) {
      const std::string n = it->path().filename().string();
      if (n.rfind(prefix, 0) != 0) continue;
      const std::string pid = n.substr(prefix.size());
      if (pid.empty() || pid.find_first_not_of("0123456789") != std::string::npos) continue;
      const long long p = std::stoll(pid);
      if (p != static_cast<long long>(::getpid()) && ::kill(static_cast<pid_t>(p), 0) != 0 && errno == ESRCH) {
        std::error_code ec2;
        fs::remove_all(it->path(), ec2);
      }
    }
  }

  std::filesystem::path dir_, staging_;
  nlohmann::json files_ = nlohmann::json::object();
  bool committed_ = false;
};

namespace detail {

/// How every reader here reports a JSON field of the wrong type: field "format" must be a string, got object.
inline std::string json_type_problem(std::string_view field, std::string_view want, const nlohmann::json& got) {
  return "field \"" + std::string(field) + "\" must be " + std::string(want) + ", got " + got.type_name();
}

/// The string field `key` of the object `j`, "" when absent; a value of another type is an error naming
/// `where` and the field.
inline std::string optional_string_field(const nlohmann::json& j, const char* key, const std::string& where) {
  const auto it = j.find(key);
  if (it == j.end()) return {};
  MIXMOE_CHECK(it->is_string(), "checkpoint", where, ": ", json_type_problem(key, "a string", *it));
  return it->get<std::string>();
}

/// Empty when the object `j` has a "format_version" this version reads (an integer from 0 to
/// kCheckpointFormatVersion), else what is wrong with it. An absent field is a problem when `required`.
inline std::string format_version_problem(const nlohmann::json& j, bool required) {
  const auto it = j.find("format_version");
  if (it == j.end()) return required ? "field \"format_version\" missing" : "";
  if (!it->is_number_integer()) return json_type_problem("format_version", "an integer", *it);
  const bool known = it->is_number_unsigned()
                         ? it->get<std::uint64_t>() <= static_cast<std::uint64_t>(kCheckpointFormatVersion)
                         : it->get<std::int64_t>() >= 0 && it->get<std::int64_t>() <= kCheckpointFormatVersion;
  if (!known)
    return "unsupported format_version " + it->dump() + " (this version reads up to " +
           std::to_string(kCheckpointFormatVersion) + ")";
  return {};
}

/// Empty when `dir` holds a complete checkpoint, else what is wrong with it.
inline std::string checkpoint_problem(const std::filesystem::path& dir, bool verify_digests) {
  namespace fs = std::filesystem;
  std::error_code ec;
  if (!fs::is_directory(dir, ec)) return "no such directory";
  const fs::path mpath = dir / kCheckpointManifest;
  if (!fs::exists(mpath, ec))
    return std::string("no ") + kCheckpointManifest + ": the checkpoint was not completed (interrupted save?)";
  const std::string manifest = kCheckpointManifest;
  nlohmann::json m;
  try {
    m = nlohmann::json::parse(read_file(mpath));
  } catch (const nlohmann::json::exception& e) {
    return manifest + " is not valid JSON: " + e.what();
  } catch (const Error& e) {
    return e.what();
  }
  if (!m.is_object()) return manifest + ": expected a JSON object, got " + m.type_name();
  if (m.contains("format") && !m["format"].is_string())
    return manifest + ": " + json_type_problem("format", "a string", m["format"]);
  if (!m.contains("format") || m["format"] != "mixmoe-checkpoint")
    return manifest + " is not a mixmoe checkpoint manifest (\"format\": \"mixmoe-checkpoint\" missing)";
  if (const auto v = format_version_problem(m, true); !v.empty()) return manifest + ": " + v;
  if (!m.contains("files")) return manifest + ": field \"files\" missing";
  const nlohmann::json& files = m["files"];
  if (!files.is_object()) return manifest + ": " + json_type_problem("files", "an object", files);
  for (auto it = files.begin(); it != files.end(); ++it) {
    const std::string& name = it.key();
    // Only plain names, as CheckpointWriter::add_file writes them: never a path out of the directory.
    if (name.empty() || name == "." || name == ".." || name == kCheckpointManifest ||
        name.find_first_of(std::string_view("/\0", 2)) != std::string::npos)
      return manifest + ": invalid file name " + nlohmann::json(name).dump();
    const fs::path f = dir / name;
    const auto& info = it.value();
    if (!info.is_object() || !info.contains("size") || !info["size"].is_number_unsigned() || !info.contains("sha256") ||
        !info["sha256"].is_string())
      return manifest + ": bad entry for " + name + " (expected {\"size\": bytes, \"sha256\": hex digest})";
    if (!fs::exists(f, ec)) return name + " is missing";
    const auto want = info["size"].get<std::uint64_t>();
    if (!fs::is_regular_file(f, ec)) return name + " is not a regular file";
    const auto have = static_cast<std::uint64_t>(fs::file_size(f, ec));
    if (ec) return name + ": cannot read its size: " + ec.message();
    if (have != want)
      return name + " has " + std::to_string(have) + " bytes, the manifest says " + std::to_string(want);
    if (verify_digests) {
      std::string digest;
      try {
        digest = sha256_hex(read_file(f));
      } catch (const Error& e) {
        return e.what();
      }
      if (digest != info["sha256"].get<std::string>())
        return name + " does not match its SHA-256 in the manifest (corrupted)";
    }
  }
  return {};
}

}  // namespace detail

/// The directory to load from: `dir` when it holds a complete checkpoint (manifest present and
/// every listed file of the listed size and, with verify_digests, SHA-256), else "<dir>.old"
/// when that is complete (a save was killed between its two renames). Throws naming the problem.
inline std::filesystem::path open_checkpoint(const std::filesystem::path& dir, bool verify_digests = true) {
  namespace fs = std::filesystem;
  fs::path d = dir;
  if (d.filename().empty()) d = d.parent_path();
  const std::string problem = detail::checkpoint_problem(d, verify_digests);
  if (problem.empty()) return d;
  const fs::path old(d.string() + ".old");
  if (detail::checkpoint_problem(old, verify_digests).empty()) return old;
  detail::fail("checkpoint", d.string(), ": ", problem);
}

// ---- model weights and configuration -----------------------------------------------------

/// What config.json says besides the weights.
struct ModelInfo {
  ModelConfig config;
  std::string model_type;
  std::string dtype;  // "F32" or "F64": the stored parameter type
  nlohmann::json extra;
};

struct LoadOptions {
  /// Refuse a checkpoint whose configuration differs from model.config (other than seed and
  /// init_std, which only affect initialisation): rope_theta or norm_eps change the outputs
  /// without changing any shape.
  bool check_config = true;
  bool verify_digests = true;
};

namespace detail {

inline nlohmann::json model_info_json(const ModelConfig& cfg, const std::string& model_type, const char* dtype,
                                      const nlohmann::json& extra) {
  return {{"format", "mixmoe"}, {"format_version", kCheckpointFormatVersion}, {"model_type", model_type},
          {"dtype", dtype},     {"config", model_config_to_json(cfg)},        {"extra", extra}};
}

/// Reads config.json (parsed); `where` names the file in errors. Every field is type-checked: a
/// value of the wrong JSON type is an error naming the file and the field, never a json exception.
inline ModelInfo model_info_from_json(const nlohmann::json& j, const std::string& where) {
  MIXMOE_CHECK(j.is_object(), "checkpoint", where, ": not a mixmoe model configuration (expected a JSON object, got ",
               j.type_name(), ")");
  MIXMOE_CHECK(optional_string_field(j, "format", where) == "mixmoe", "checkpoint", where,
               ": not a mixmoe model configuration (\"format\": \"mixmoe\" missing)");
  const std::string version = format_version_problem(j, false);
  MIXMOE_CHECK(version.empty(), "checkpoint", where, ": ", version);
  MIXMOE_CHECK(j.contains("config"), "checkpoint", where, ": no \"config\" object");
  ModelInfo info;
  info.model_type = optional_string_field(j, "model_type", where);
  info.dtype = optional_string_field(j, "dtype", where);
  info.config = model_config_from_json(j["config"], where + ": config");
  info.extra = j.contains("extra") ? j["extra"] : nlohmann::json();
  return info;
}

inline bool is_safetensors_path(const std::filesystem::path& p) { return p.extension() == ".safetensors"; }

template <class M>
concept ConfiguredModule = Module<M> && requires(M& m) {
  { m.config } -> std::convertible_to<ModelConfig>;
};

template <Module M>
SafetensorsWriter parameters_writer(M& model) {
  SafetensorsWriter w;
  for (auto& [name, p] : named_parameters(model)) w.add(name, to_device<Cpu>(p.value()));
  return w;
}

inline std::string name_list(const std::vector<std::string>& names, std::size_t first = 5) {
  std::string s;
  for (std::size_t i = 0; i < names.size() && i < first; ++i) s += (i ? ", " : "") + names[i];
  if (names.size() > first) s += ", ... (" + std::to_string(names.size() - first) + " more)";
  return s;
}

/// Copies the file's tensors into the model's parameters, after checking that the names match
/// exactly (tensors whose name starts with `skip_prefix` are ignored) and every shape agrees.
template <Module M>
void load_parameters_from(M& model, const SafetensorsFile& f) {
  using T = typename M::value_type;
  auto params = named_parameters(model);
  std::vector<std::string> missing, unexpected, mismatched;
  std::map<std::string, bool> known;
  for (auto& [name, p] : params) {
    known[name] = true;
    if (!f.contains(name)) {
      missing.push_back(name);
    } else if (!SafetensorsFile::same_shape(f.entry(name), p.shape())) {
      std::ostringstream os;
      os << name << ": file " << SafetensorsFile::shape_string(f.entry(name).shape) << ", model " << p.shape();
      mismatched.push_back(os.str());
    }
  }
  for (const auto& n : f.names())
    if (!known.count(n)) unexpected.push_back(n);
  if (!missing.empty() || !unexpected.empty() || !mismatched.empty()) {
    std::string msg;
    if (!missing.empty()) msg += std::to_string(missing.size()) + " missing (" + name_list(missing) + ")";
    if (!unexpected.empty())
      msg +=
          (msg.empty() ? "" : "; ") + std::to_string(unexpected.size()) + " unexpected (" + name_list(unexpected) + ")";
    if (!mismatched.empty())
      msg += (msg.empty() ? "" : "; ") + std::to_string(mismatched.size()) + " with a different shape (" +
             name_list(mismatched) + ")";
    fail("checkpoint", f.origin(), " does not match the model: ", msg);
  }
  using D = typename M::device_type;
  for (auto& [name, p] : params) p.value().copy_from(to_device<D>(f.get<T>(name)));
}

template <Module M>
void check_config_matches(M& model, const ModelConfig& saved, const std::string& where) {
  if constexpr (ConfiguredModule<M>) {
    nlohmann::json a = model_config_to_json(model.config), b = model_config_to_json(saved);
    for (auto* j : {&a, &b}) {
      j->erase("seed");
      j->erase("init_std");
    }
    if (a == b) return;
    std::string diff;
    for (auto it = a.begin(); it != a.end(); ++it)
      if (it.value() != b[it.key()])
        diff += (diff.empty() ? "" : ", ") + it.key() + ": model " + it.value().dump() + ", checkpoint " +
                b[it.key()].dump();
    fail("checkpoint", where, ": the model's configuration differs from the checkpoint's (", diff,
         "); build the model from read_model_config() or pass LoadOptions{.check_config = false}");
  }
}

}  // namespace detail

/// Saves a model with its configuration: to a checkpoint directory (model.safetensors,
/// config.json, MANIFEST.json; replaced atomically), or, for a path ending in ".safetensors", to
/// that one file with the configuration in its metadata. `model_type` names the architecture
/// for the caller ("mixmoe-mix-fft"); `extra` is any JSON (tokenizer file, languages, ...).
template <detail::ConfiguredModule M>
void save_model(M& model, const std::filesystem::path& path, const std::string& model_type,
                const nlohmann::json& extra = nlohmann::json::object()) {
  using T = typename M::value_type;
  const char* dtype = dtype_name(dtype_of<T>());
  SafetensorsWriter w = detail::parameters_writer(model);
  if (detail::is_safetensors_path(path)) {
    w.set_metadata("format", "mixmoe");
    w.set_metadata("mixmoe.model_type", model_type);
    w.set_metadata("mixmoe.config", model_config_to_json(model.config).dump());
    w.set_metadata("mixmoe.extra", extra.dump());
    w.write(path);
    return;
  }
  CheckpointWriter ck(path);
  ck.add_file("model.safetensors", w.serialize());
  ck.add_file("config.json", detail::model_info_json(model.config, model_type, dtype, extra).dump(2) + "\n");
  ck.commit();
}

/// The configuration, model type and extra JSON of a checkpoint directory or weights file.
inline ModelInfo read_model_info(const std::filesystem::path& path, bool verify_digests = true) {
  if (detail::is_safetensors_path(path)) {
    const auto f = SafetensorsFile::open(path);
    const auto& md = f.metadata();
    MIXMOE_CHECK(md.count("mixmoe.config"), "checkpoint", path.string(), ": no mixmoe.config in the metadata");
    ModelInfo info;
    try {
      info.config =
          model_config_from_json(nlohmann::json::parse(md.at("mixmoe.config")), path.string() + ": mixmoe.config");
      if (md.count("mixmoe.extra")) info.extra = nlohmann::json::parse(md.at("mixmoe.extra"));
    } catch (const nlohmann::json::exception& e) {
      detail::fail("checkpoint", path.string(), ": metadata is not valid JSON: ", e.what());
    }
    info.model_type = md.count("mixmoe.model_type") ? md.at("mixmoe.model_type") : "";
    return info;
  }
  const auto dir = open_checkpoint(path, verify_digests);
  const auto where = (dir / "config.json").string();
  nlohmann::json j;
  try {
    j = nlohmann::json::parse(read_file(dir / "config.json"));
  } catch (const nlohmann::json::exception& e) {
    detail::fail("checkpoint", where, ": not valid JSON: ", e.what());
  }
  return detail::model_info_from_json(j, where);
}

/// The ModelConfig of a checkpoint directory or weights file (build the model from it, then load_model).
inline ModelConfig read_model_config(const std::filesystem::path& path) { return read_model_info(path).config; }

/// Loads the weights of a checkpoint directory or weights file into the model's existing
/// parameters. Every parameter must be present with its shape and the file must hold no other
/// tensor; the error lists the first few missing, unexpected and mismatched names.
template <Module M>
void load_model(M& model, const std::filesystem::path& path, const LoadOptions& opt = {}) {
  const bool file = detail::is_safetensors_path(path);
  const auto dir = file ? path : open_checkpoint(path, opt.verify_digests);
  if (opt.check_config) {
    if constexpr (detail::ConfiguredModule<M>) {
      const auto info = read_model_info(dir, false);
      detail::check_config_matches(model, info.config, file ? path.string() : (dir / "config.json").string());
    }
  }
  detail::load_parameters_from(model, SafetensorsFile::open(file ? path : dir / "model.safetensors"));
}

// ---- training state ----------------------------------------------------------------------

/// Everything besides the model and optimizer that a training loop needs to resume exactly.
struct TrainState {
  std::int64_t global_step = 0;
  std::int64_t epoch = 0;
  nlohmann::json data_position;                 // the data loader's position, opaque
  std::map<std::string, Generator::State> rng;  // named generators (data order, dropout, ...)
  nlohmann::json scheduler;                     // learning-rate schedule state, opaque
  std::optional<double> best_validation;        // best validation score so far
  std::int64_t skipped_steps = 0;               // steps skipped (non-finite loss or gradients)
  nlohmann::json extra;                         // anything else

  /// Records / restores a named generator.
  void save_rng(const std::string& name, const Generator& g) { rng[name] = g.state(); }
  void restore_rng(const std::string& name, Generator& g) const {
    auto it = rng.find(name);
    MIXMOE_CHECK(it != rng.end(), "checkpoint", "the training state has no generator '", name, "'");
    g.set_state(it->second);
  }
};

namespace detail {

inline std::string hex64(std::uint64_t x) {
  char buf[19];
  std::snprintf(buf, sizeof buf, "%016llx", static_cast<unsigned long long>(x));
  return buf;
}

inline std::uint64_t parse_hex64(const nlohmann::json& j, const std::string& where) {
  MIXMOE_CHECK(j.is_string() && j.get<std::string>().size() == 16 &&
                   j.get<std::string>().find_first_not_of("0123456789abcdef") == std::string::npos,
               "checkpoint", where, ": expected 16 hex digits, got ", j.dump());
  return std::stoull(j.get<std::string>(), nullptr, 16);
}

// Doubles whose bits must survive (RNG spare value, options) are stored as the hex of their bits.
inline std::string double_bits(double x) { return hex64(std::bit_cast<std::uint64_t>(x)); }
inline double double_from_bits(const nlohmann::json& j, const std::string& where) {
  return std::bit_cast<double>(parse_hex64(j, where));
}

inline std::int64_t get_int(const nlohmann::json& j, const char* key, const std::string& where) {
  MIXMOE_CHECK(j.contains(key), "checkpoint", where, ": field \"", key, "\" missing");
  const nlohmann::json& v = j[key];
  MIXMOE_CHECK(v.is_number_integer(), "checkpoint", where, ": ", json_type_problem(key, "an integer", v));
  MIXMOE_CHECK(!v.is_number_unsigned() ||
                   v.get<std::uint64_t>() <= static_cast<std::uint64_t>(std::numeric_limits<std::int64_t>::max()),
               "checkpoint", where, ": field \"", key, "\" is out of range: ", v.dump());
  return v.get<std::int64_t>();
}

}  // namespace detail

inline nlohmann::json train_state_to_json(const TrainState& s) {
  nlohmann::json rng = nlohmann::json::object();
  for (const auto& [name, st] : s.rng)
    rng[name] = {
        {"s", {detail::hex64(st.s[0]), detail::hex64(st.s[1]), detail::hex64(st.s[2]), detail::hex64(st.s[3])}},
        {"spare_bits", detail::double_bits(st.spare)},
        {"have_spare", st.have_spare}};
  nlohmann::json best = nullptr;
  if (s.best_validation) best = {{"value", *s.best_validation}, {"bits", detail::double_bits(*s.best_validation)}};
  return {{"global_step", s.global_step},     {"epoch", s.epoch},
          {"data_position", s.data_position}, {"rng", rng},
          {"scheduler", s.scheduler},         {"best_validation", best},
          {"skipped_steps", s.skipped_steps}, {"extra", s.extra}};
}

/// Reads the training state written by train_state_to_json(); `where` names the object in errors
/// ("run/ckpt/trainer_state.json: state"). A field of the wrong JSON type is an error naming the field.
inline TrainState train_state_from_json(const nlohmann::json& j, const std::string& where) {
  MIXMOE_CHECK(j.is_object(), "checkpoint", where, ": the training state is not an object (got ", j.type_name(), ")");
  TrainState s;
  s.global_step = detail::get_int(j, "global_step", where);
  s.epoch = detail::get_int(j, "epoch", where);
  s.skipped_steps = detail::get_int(j, "skipped_steps", where);
  // Opaque to this reader: any JSON value.
  for (auto [key, out] : {std::pair{"data_position", &s.data_position}, std::pair{"scheduler", &s.scheduler},
                          std::pair{"extra", &s.extra}})
    if (const auto it = j.find(key); it != j.end()) *out = *it;
  if (const auto it = j.find("best_validation"); it != j.end() && !it->is_null()) {
    MIXMOE_CHECK(it->is_object(), "checkpoint", where, ": ",
                 detail::json_type_problem("best_validation", "an object ({\"value\", \"bits\"}) or null", *it));
    MIXMOE_CHECK(it->contains("bits"), "checkpoint", where, ": best_validation: field \"bits\" missing");
    s.best_validation = detail::double_from_bits((*it)["bits"], where + ": best_validation.bits");
  }
  if (j.contains("rng")) {
    MIXMOE_CHECK(j["rng"].is_object(), "checkpoint", where, ": ",
                 detail::json_type_problem("rng", "an object", j["rng"]));
    for (auto it = j["rng"].begin(); it != j["rng"].end(); ++it) {
      const std::string w = where + ": rng." + it.key();
      const auto& g = it.value();
      MIXMOE_CHECK(g.is_object() && g.contains("s") && g["s"].is_array() && g["s"].size() == 4 &&
                       g.contains("have_spare") && g["have_spare"].is_boolean() && g.contains("spare_bits"),
                   "checkpoint", w, ": expected {s: [4 hex words], spare_bits, have_spare}");
      Generator::State st{};
      for (std::size_t i = 0; i < 4; ++i) st.s[i] = detail::parse_hex64(g["s"][i], w);
      st.spare = detail::double_from_bits(g["spare_bits"], w);
      st.have_spare = g["have_spare"].get<bool>();
      s.rng[it.key()] = st;
    }
  }
  return s;
}

namespace detail {

/// The model's name of each of the optimizer's parameters (matched by identity).
template <Module M, Scalar T, Device D>
std::vector<std::string> optimizer_parameter_names(M& model, const Optimizer<T, D>& opt) {
  std::map<const void*, std::string> by_node;
  for (auto& [name, p] : named_parameters(model)) by_node[p.node().get()] = name;
  std::vector<std::string> names;
  const auto& ps = opt.parameters();
  for (std::size_t i = 0; i < ps.size(); ++i) {
    auto it = by_node.find(ps[i].node().get());
    MIXMOE_CHECK(it != by_node.end(), "checkpoint", "optimizer parameter ", i, " (shape ", ps[i].shape(),
                 ") is not a parameter of the model");
    names.push_back(it->second);
  }
  return names;
}

}  // namespace detail

/// Saves a full training checkpoint to the directory `dir` (replaced atomically as a whole): the
/// model (as save_model), AdamW's moments under "adam.m.<name>" / "adam.v.<name>" (undefined
/// moments absent), its step count and options, and `state`.
template <detail::ConfiguredModule M, Scalar T, Device D>
void save_training_state(const std::filesystem::path& dir, M& model, AdamW<T, D>& opt, const TrainState& state,
                         const std::string& model_type = "mixmoe",
                         const nlohmann::json& extra = nlohmann::json::object()) {
  static_assert(std::is_same_v<typename M::value_type, T>,
                "save_training_state: model and optimizer scalar types differ");
  const auto names = detail::optimizer_parameter_names(model, opt);
  SafetensorsWriter ow;
  for (std::size_t i = 0; i < names.size(); ++i) {
    if (opt.first_moments()[i].defined()) ow.add("adam.m." + names[i], to_device<Cpu>(opt.first_moments()[i]));
    if (opt.second_moments()[i].defined()) ow.add("adam.v." + names[i], to_device<Cpu>(opt.second_moments()[i]));
  }
  ow.set_metadata("format", "mixmoe");
  ow.set_metadata("optimizer", "AdamW");
  const auto& o = opt.options();
  const nlohmann::json optimizer = {
      {"type", "AdamW"},
      {"steps", opt.steps()},
      {"parameters", names},
      {"options",
       {{"lr", o.lr}, {"beta1", o.beta1}, {"beta2", o.beta2}, {"eps", o.eps}, {"weight_decay", o.weight_decay}}},
      {"options_bits",
       {{"lr", detail::double_bits(o.lr)},
        {"beta1", detail::double_bits(o.beta1)},
        {"beta2", detail::double_bits(o.beta2)},
        {"eps", detail::double_bits(o.eps)},
        {"weight_decay", detail::double_bits(o.weight_decay)}}}};
  const nlohmann::json trainer = {{"format", "mixmoe"},
                                  {"format_version", kCheckpointFormatVersion},
                                  {"state", train_state_to_json(state)},
                                  {"optimizer", optimizer}};
  CheckpointWriter ck(dir);
  ck.add_file("model.safetensors", detail::parameters_writer(model).serialize());
  ck.add_file("config.json",
              detail::model_info_json(model.config, model_type, dtype_name(dtype_of<T>()), extra).dump(2) + "\n");
  ck.add_file("optimizer.safetensors", ow.serialize());
  ck.add_file("trainer_state.json", trainer.dump(2) + "\n");
  ck.commit();
}

/// Restores a training checkpoint into an existing model and AdamW (built as for the original
/// run: same parameters in the optimizer, same betas, eps and weight decay) and returns the
/// TrainState. The learning rate and step count are restored; the caller restores its
/// generators with state.restore_rng(). After this, training continues bit-identically.
template <Module M, Scalar T, Device D>
TrainState load_training_state(const std::filesystem::path& dir, M& model, AdamW<T, D>& opt,
                               const LoadOptions& lo = {}) {
  namespace fs = std::filesystem;
  const fs::path d = open_checkpoint(dir, lo.verify_digests);
  load_model(model, d, {.check_config = lo.check_config, .verify_digests = false});
  const std::string where = (d / "trainer_state.json").string();
  nlohmann::json tj;
  try {
    tj = nlohmann::json::parse(read_file(d / "trainer_state.json"));
  } catch (const nlohmann::json::exception& e) {
    detail::fail("checkpoint", where, ": not valid JSON: ", e.what());
  }
  MIXMOE_CHECK(tj.is_object() && tj.contains("state") && tj.contains("optimizer"), "checkpoint", where,
               ": expected {state, optimizer}");
  const std::string version = detail::format_version_problem(tj, false);
  MIXMOE_CHECK(version.empty(), "checkpoint", where, ": ", version);
  // A field of the wrong JSON type (a hand-edited or damaged file) is reported like any other defect.
  try {
    const auto& oj = tj["optimizer"];
    MIXMOE_CHECK(oj.is_object(), "checkpoint", where, ": ", detail::json_type_problem("optimizer", "an object", oj));
    const std::string type = detail::optional_string_field(oj, "type", where + ": optimizer");
    MIXMOE_CHECK(type == "AdamW", "checkpoint", where, ": the checkpoint's optimizer is ",
                 type.empty() ? std::string("unknown") : type, ", not AdamW");

    // The same parameters must be optimised (order may differ: the moments are keyed by name).
    const auto names = detail::optimizer_parameter_names(model, opt);
    std::vector<std::string> saved;
    if (const auto it = oj.find("parameters"); it != oj.end()) {
      MIXMOE_CHECK(it->is_array(), "checkpoint", where,
                   ": optimizer: ", detail::json_type_problem("parameters", "an array of names", *it));
      for (const auto& n : *it) {
        MIXMOE_CHECK(n.is_string(), "checkpoint", where, ": optimizer: field \"parameters\" must hold names, got ",
                     n.type_name(), " ", n.dump());
        saved.push_back(n.get<std::string>());
      }
    }
    std::vector<std::string> now = names, only_now, only_saved;
    std::sort(saved.begin(), saved.end());
    std::sort(now.begin(), now.end());
    std::set_difference(now.begin(), now.end(), saved.begin(), saved.end(), std::back_inserter(only_now));
    std::set_difference(saved.begin(), saved.end(), now.begin(), now.end(), std::back_inserter(only_saved));
    MIXMOE_CHECK(only_now.empty() && only_saved.empty(), "checkpoint", where,
                 ": the optimizer's parameters differ from the checkpoint's: ", only_now.size(),
                 " only in the optimizer (", detail::name_list(only_now), "), ", only_saved.size(),
                 " only in the checkpoint (", detail::name_list(only_saved), ")");

    MIXMOE_CHECK(oj.contains("options_bits") && oj["options_bits"].is_object(), "checkpoint", where,
                 ": optimizer.options_bits missing");
    const auto& bits = oj["options_bits"];
    for (const char* key : {"lr", "beta1", "beta2", "eps", "weight_decay"})
      MIXMOE_CHECK(bits.contains(key), "checkpoint", where, ": optimizer.options_bits.", key, " missing");
    const AdamWOptions& o = opt.options();
    auto check_option = [&](const char* key, double have) {
      const double want = detail::double_from_bits(bits[key], where + ": options_bits");
      MIXMOE_CHECK(std::bit_cast<std::uint64_t>(want) == std::bit_cast<std::uint64_t>(have), "checkpoint", where,
                   ": AdamW ", key, " is ", have, " but the checkpoint was trained with ", want);
    };
    check_option("beta1", o.beta1);
    check_option("beta2", o.beta2);
    check_option("eps", o.eps);
    check_option("weight_decay", o.weight_decay);

    const SafetensorsFile f = SafetensorsFile::open(d / "optimizer.safetensors");
    std::map<std::string, bool> used;
    for (std::size_t i = 0; i < names.size(); ++i) {
      const Shape s = opt.parameters()[i].shape();
      for (auto [prefix, vec] :
           {std::pair{"adam.m.", &opt.first_moments()}, std::pair{"adam.v.", &opt.second_moments()}}) {
        const std::string key = prefix + names[i];
        if (f.contains(key)) {
          (*vec)[i] = to_device<D>(f.get<T>(key, s));
          used[key] = true;
        } else {
          (*vec)[i] = Tensor<T, D>();
        }
      }
    }
    for (const auto& n : f.names())
      MIXMOE_CHECK(used.count(n), "checkpoint", f.origin(), ": unexpected tensor '", n, "'");
    opt.set_steps(detail::get_int(oj, "steps", where));
    opt.set_lr(detail::double_from_bits(bits["lr"], where + ": options_bits"));
    return train_state_from_json(tj["state"], where + ": state");
  } catch (const nlohmann::json::exception& e) {
    detail::fail("checkpoint", where, ": malformed: ", e.what());
  }
}

}  // namespace mixmoe
