// The host model's cub::DeviceRadixSort::SortPairs (see ../../cuda_runtime.h): a stable sort of
// (key, value) pairs by the key bits [begin_bit, end_bit), done on the host in the call. As cub's,
// a first call with a null temporary buffer only sets the size it needs; the second must pass a
// device buffer at least that large (cudaErrorInvalidValue otherwise). Keys and values outside
// device memory stop the program with a message.
#pragma once

#include <algorithm>
#include <cstddef>
#include <numeric>
#include <tuple>
#include <vector>

#include "../../cuda_runtime.h"

namespace cub {

struct DeviceRadixSort {
  template <class K, class V, class N>
  static cudaError_t SortPairs(void* temp, std::size_t& temp_bytes, const K* keys_in, K* keys_out,
                               const V* values_in, V* values_out, N num_items, int begin_bit = 0,
                               int end_bit = static_cast<int>(sizeof(K) * 8), cudaStream_t stream = nullptr) {
    using host_model::Runtime;
    const std::size_t n = num_items < 0 ? 0 : static_cast<std::size_t>(num_items);
    const std::size_t need = 256 + n * (sizeof(K) + sizeof(V));  // what a radix sort would ask for
    if (temp == nullptr) {
      temp_bytes = need;
      return cudaSuccess;
    }
    if (num_items < 0 || begin_bit < 0 || end_bit > static_cast<int>(sizeof(K) * 8) || begin_bit > end_bit)
      return Runtime::fail_with(cudaErrorInvalidValue);
    if (temp_bytes < need || !Runtime::instance().on_device(temp, need)) return Runtime::fail_with(cudaErrorInvalidValue);
    if (Runtime::instance().check_stream(stream) != cudaSuccess) return cudaErrorInvalidResourceHandle;
    if (n == 0) return cudaSuccess;
    for (const auto& [p, bytes, what] : {std::tuple{static_cast<const void*>(keys_in), n * sizeof(K), "keys_in"},
                                         std::tuple{static_cast<const void*>(keys_out), n * sizeof(K), "keys_out"},
                                         std::tuple{static_cast<const void*>(values_in), n * sizeof(V), "values_in"},
                                         std::tuple{static_cast<const void*>(values_out), n * sizeof(V), "values_out"}})
      if (!Runtime::instance().on_device(p, bytes)) {
        std::fprintf(stderr, "host model: cub::DeviceRadixSort::SortPairs %s is not inside a device block\n", what);
        host_model::fail("cub read or wrote outside device memory");
      }
    const int width = end_bit - begin_bit;
    const auto bits = [&](K k) {
      const K shifted = static_cast<K>(k >> begin_bit);
      return width >= static_cast<int>(sizeof(K) * 8) ? shifted : static_cast<K>(shifted & ((K(1) << width) - 1));
    };
    std::vector<std::size_t> order(n);
    std::iota(order.begin(), order.end(), std::size_t{0});
    std::stable_sort(order.begin(), order.end(),
                     [&](std::size_t a, std::size_t b) { return bits(keys_in[a]) < bits(keys_in[b]); });
    std::vector<K> k(n);
    std::vector<V> v(n);
    for (std::size_t i = 0; i < n; ++i) {
      k[i] = keys_in[order[i]];
      v[i] = values_in[order[i]];
    }
    std::copy(k.begin(), k.end(), keys_out);
    std::copy(v.begin(), v.end(), values_out);
    return cudaSuccess;
  }
};

}  // namespace cub
