// Signals: the stop signals a training run polls, sending a signal to a
// rank, and the temporary files a signal that ends the process removes
// first. Only async-signal-safe calls (write, unlink, _exit, sigaction,
// raise) are made in the handlers. The one Rust caller is src/shim.rs.
#include <signal.h>
#include <unistd.h>

#include <atomic>
#include <cstdio>
#include <cstring>

namespace {

// Files being written (a TempFile beside its target): a slot is claimed
// (1), its path copied, then published (2); a handler unlinks the
// published ones. A path too long for a slot, or a full table, is not
// registered (then a signal leaves that file, as before).
constexpr int kSlots = 64;
constexpr size_t kPathMax = 4096;
char g_paths[kSlots][kPathMax];
std::atomic<int> g_state[kSlots];

void remove_temp_files() {
  for (int i = 0; i < kSlots; ++i) {
    if (g_state[i].load() == 2) {
      unlink(g_paths[i]);
    }
  }
}

// Sets `handler` (or SIG_DFL) for `sig`, restarting interrupted calls.
void handle(int sig, void (*handler)(int)) {
  struct sigaction sa;
  std::memset(&sa, 0, sizeof sa);
  sa.sa_handler = handler;
  sigemptyset(&sa.sa_mask);
  sa.sa_flags = SA_RESTART;
  sigaction(sig, &sa, nullptr);
}

void say(const char *msg) {
  ssize_t ignored = write(2, msg, std::strlen(msg));
  (void)ignored;
}

// The first SIGINT or SIGTERM asks a training run to stop after its step
// (the run polls `vggctl_stop_signal`); a second one ends the process at
// once with _exit, which runs no exit handlers and no static destructors,
// so libtorch's threads are never torn down under their feet.
volatile sig_atomic_t g_stop_signal = 0;

void on_stop_signal(int sig) {
  if (g_stop_signal != 0) {
    remove_temp_files();
    say("\nvggctl: stopped without saving\n");
    _exit(128 + sig);
  }
  g_stop_signal = sig;
  say(sig == SIGTERM ? "\nterminated: stopping after this step...\n"
                     : "\nstopping after this step (Ctrl-C again to quit without saving)...\n");
}

// A signal that ends a command without stop signals (export, prepare,
// eval, a download): the files being written are removed, then the signal
// ends the process as it would have (its default action, re-raised).
void on_ending_signal(int sig) {
  remove_temp_files();
  handle(sig, SIG_DFL);
  raise(sig);
}

// Installs `on_ending_signal` for the signals that end a process from the
// terminal or a launcher, where they still have their default action (a
// training run's stop handler, or an ignored SIGHUP under nohup, stays).
void install_ending_signals() {
  const int ending[] = {SIGINT, SIGTERM, SIGHUP};
  for (int sig : ending) {
    struct sigaction old;
    if (sigaction(sig, nullptr, &old) == 0 && old.sa_handler == SIG_DFL) {
      handle(sig, on_ending_signal);
    }
  }
}

std::atomic<bool> g_ending_installed{false};

}  // namespace

extern "C" {

void vggctl_install_stop_signals() {
  handle(SIGINT, on_stop_signal);
  handle(SIGTERM, on_stop_signal);
}

int vggctl_stop_signal() { return g_stop_signal; }

// Sends `sig` to process `pid` (the ranks `--nproc-per-node` started).
int vggctl_send_signal(int pid, int sig) { return kill(static_cast<pid_t>(pid), sig); }

// Ends the process with `code` once C's streams are flushed, without the
// static destructors: libtorch's take a tenth of a second to take every
// operator out of its dispatcher again, on every command's way out.
void vggctl_exit_now(int code) {
  std::fflush(nullptr);
  _exit(code);
}

// Registers `path` (a file being written) to be removed should a signal
// end the process; the slot to release, or -1 where it was not registered.
int vggctl_temp_add(const char *path) {
  size_t n = std::strlen(path);
  if (n >= kPathMax) {
    return -1;
  }
  if (!g_ending_installed.exchange(true)) {
    install_ending_signals();
  }
  for (int i = 0; i < kSlots; ++i) {
    int free = 0;
    if (g_state[i].compare_exchange_strong(free, 1)) {
      std::memcpy(g_paths[i], path, n + 1);
      g_state[i].store(2);
      return i;
    }
  }
  return -1;
}

// Releases a slot of `vggctl_temp_add` (the file was renamed or removed).
void vggctl_temp_remove(int slot) {
  if (slot >= 0 && slot < kSlots) {
    g_state[slot].store(0);
  }
}

}  // extern "C"
