// What every C++ file of the shim shares: an exception never crosses into
// Rust; it comes back as a non-zero status with its message copied into
// the caller's buffer.
#pragma once

#include <cstddef>
#include <cstring>
#include <exception>
#include <string>

namespace vggctl_shim {

inline void copy_err(const std::string &msg, char *err, size_t len) {
  if (err == nullptr || len == 0) return;
  size_t n = msg.size() < len - 1 ? msg.size() : len - 1;
  std::memcpy(err, msg.data(), n);
  err[n] = '\0';
}

// Runs `f`: 0 when it returns, 1 with the message in `err` when it throws.
template <typename F>
int guarded(char *err, size_t len, F f) {
  try {
    f();
    return 0;
  } catch (const std::exception &e) {
    copy_err(e.what(), err, len);
  } catch (...) {
    copy_err("unknown C++ exception", err, len);
  }
  return 1;
}

}  // namespace vggctl_shim
