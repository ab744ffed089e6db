// blip3o.hpp: header-only C++ embedding of the BLIP3-o runtime (`runtime.Generator`).
//
//     blip3o::Generator gen("engines/tiny-fp32");             // onnxruntime on the CPU
//     blip3o::Image image = gen.generate("a red circle", {});  // GeneratorParams: seed 0...
//     std::string text = gen.answer(image, "Describe the image.");
//
// The sampler, tokenizer and sessions stay in Python (one implementation, tested once); this
// header only moves plain values across pybind11's embedded interpreter: strings, numbers and
// RGB byte buffers. No pybind11 or Python type appears in the public API; a host links the
// `blip3o` CMake target (pybind11's headers and libpython, through pybind11::embed).
//
// Python environment. The embedded interpreter is the libpython this program links against, and
// it must be able to import `runtime` and its base dependencies (numpy, onnxruntime, tokenizers,
// pillow): the base install, `pip install .` from the repository root. When that install lives in
// a venv, point the interpreter at it, either
//   - from the environment: PYTHONPATH=<repo root>:<venv>/lib/pythonX.Y/site-packages, plus
//     PYTHONHOME=<sys.base_prefix of the venv's python> when libpython was built for another
//     prefix (relocated builds, e.g. python-build-standalone); or
//   - from code: the `python_path` constructor argument. Each directory goes to the front of
//     `sys.path` and its .pth files are processed (site.addsitedir), so a venv's site-packages
//     with an editable install works too.
//
// Interpreter lifetime. The first Generator starts an interpreter if none is running and keeps it
// until the process exits (a process-wide guard owns the `pybind11::scoped_interpreter`); CPython
// cannot be restarted reliably, so it is never finalized early. If the host already runs Python
// (it embeds it itself, or this code is loaded into a Python process), that interpreter is used
// and left alone. Start the first Generator on the main thread: the interpreter is then finalized
// at exit (Python's atexit hooks and buffers run); started on another thread it is left to the OS
// at exit, since CPython cannot finalize from a foreign thread's state. Python's signal
// handlers are not installed, so Ctrl-C keeps the host's behaviour.
//
// Thread safety. Every call takes the GIL (from any thread; the guard releases it after start-up)
// and the Python Generator's own lock, so one Generator may be shared between threads but its
// calls run one at a time. Separate Generators overlap only inside the inference sessions
// (onnxruntime releases the GIL while a graph runs); for parallel throughput use one Generator
// per process. Errors raised in Python arrive as blip3o::Error carrying the Python message.
#pragma once

#include <pybind11/embed.h>
#include <pybind11/numpy.h>

#include <cstdint>
#include <memory>
#include <optional>
#include <stdexcept>
#include <string>
#include <string_view>
#include <thread>
#include <utility>
#include <vector>

// pybind11 gives its types hidden visibility; a class holding a py::object needs the same, or g++
// warns (and a shared library would export a type whose fields it cannot export).
#if defined(__GNUC__) && !defined(_WIN32)
#define BLIP3O_HIDDEN __attribute__((visibility("hidden")))
#else
#define BLIP3O_HIDDEN
#endif

namespace blip3o {

// An error raised by the runtime: `what()` is the Python message ("ValueError: prompt is empty;
// ..."), `python_type()` the exception's class name, for hosts that branch on it.
class Error : public std::runtime_error {
 public:
  explicit Error(const std::string& message, std::string python_type = "")
      : std::runtime_error(message), python_type_(std::move(python_type)) {}
  const std::string& python_type() const noexcept { return python_type_; }

 private:
  std::string python_type_;
};

// An RGB image: width * height * 3 bytes, row-major, no padding.
struct Image {
  int width = 0;
  int height = 0;
  std::vector<std::uint8_t> rgb;
};

// The sampling settings: Python's `runtime.params.GeneratorParams`, field for field (same names,
// checked by tests/test_params.py), validated there, once; unset values take the engine folder's
// manifest defaults, as in Python.
struct GeneratorParams {
  std::int64_t seed = 0;
  std::optional<int> steps;
  std::optional<double> guidance;
  std::optional<int> decoder_steps;
  std::optional<double> decoder_guidance;
  int num_images = 1;
  std::optional<std::string> sampler;          // "euler" | "heun" | "lms" (the DiT's)
  std::optional<std::string> decoder_sampler;  // "euler" | "dpmpp_2m" (the decoder's)
  std::optional<std::string> preset;           // a preset of the engine folder, e.g. "fast"
};

// The answer's sampling options: Python's `runtime.params.AnswerParams`, field for field
// (checked by tests/test_params.py); greedy unless `temperature` > 0.
struct AnswerParams {
  int max_new_tokens = 32;
  double temperature = 0.0;
  double top_p = 1.0;
  std::int64_t seed = 0;
};

namespace detail {

// Owns the interpreter this header started. It releases the GIL right after start-up so any
// thread can take it with gil_scoped_acquire, and takes it back before finalizing at exit.
class BLIP3O_HIDDEN InterpreterGuard {
 public:
  static void ensure() {
    // A function-local static: constructed once, thread-safely, destroyed at exit after every
    // Generator built later (those are destroyed first, in reverse order of construction).
    static InterpreterGuard guard;
    (void)guard;
  }
  InterpreterGuard(const InterpreterGuard&) = delete;
  InterpreterGuard& operator=(const InterpreterGuard&) = delete;

  ~InterpreterGuard() {
    if (!interpreter_) return;
    if (std::this_thread::get_id() != owner_) {
      // Finalizing needs the starting thread's state; taking it on another thread deadlocks
      // in PyGILState_Ensure. The process is exiting anyway: leave the interpreter be.
      (void)interpreter_.release();
      return;
    }
    PyEval_RestoreThread(released_);
    interpreter_.reset();
  }

 private:
  InterpreterGuard() {
    if (Py_IsInitialized()) return;  // the host's interpreter: use it, never finalize it
    // No Python signal handlers (the host keeps Ctrl-C) and no program dir on sys.path (the
    // executable's folder is not a Python package root).
    interpreter_ = std::make_unique<pybind11::scoped_interpreter>(false, 0, nullptr, false);
    released_ = PyEval_SaveThread();
    owner_ = std::this_thread::get_id();
  }

  std::unique_ptr<pybind11::scoped_interpreter> interpreter_;
  PyThreadState* released_ = nullptr;
  std::thread::id owner_;
};

// "ValueError: message" from the active Python exception; call with the GIL held.
inline Error to_error(pybind11::error_already_set& e) {
  std::string type, message;
  try {
    type = pybind11::str(e.type().attr("__name__"));
    message = pybind11::str(e.value());
  } catch (...) {
    return Error(e.what());  // str() itself failed: fall back on pybind11's formatting
  }
  return Error(message.empty() ? type : type + ": " + message, type);
}

// Runs `fn` with the GIL held, turning Python and pybind11 exceptions into blip3o::Error.
template <typename Fn>
auto call_python(Fn&& fn) -> decltype(fn()) {
  pybind11::gil_scoped_acquire gil;
  try {
    return fn();
  } catch (pybind11::error_already_set& e) {
    throw to_error(e);  // converted here: error_already_set must die with the GIL held
  } catch (const pybind11::cast_error& e) {
    throw Error(std::string("unexpected result from the Python runtime: ") + e.what());
  } catch (const pybind11::builtin_exception& e) {
    throw Error(e.what());
  }
}

}  // namespace detail

// The runtime's Generator over one engine folder. Not copyable (it owns sessions); movable.
class BLIP3O_HIDDEN Generator {
 public:
  // `backend`: onnxruntime | tensorrt | torch; `device`: cpu | cuda (as in Python).
  // `python_path`: directories put in front of sys.path before `runtime` is imported (a repo
  // root, a venv's site-packages). `low_memory`: keep only the running stage's sessions open.
  explicit Generator(const std::string& engine_dir, const std::string& backend = "onnxruntime",
                     const std::string& device = "cpu",
                     const std::vector<std::string>& python_path = {}, bool low_memory = false) {
    namespace py = pybind11;
    using namespace py::literals;
    detail::InterpreterGuard::ensure();
    gen_ = detail::call_python([&] {
      if (!python_path.empty()) {
        auto sys_path = py::module_::import("sys").attr("path");
        auto addsitedir = py::module_::import("site").attr("addsitedir");
        // Reversed inserts keep the caller's order; addsitedir then sees each directory as
        // known, so it only processes its .pth files.
        for (auto it = python_path.rbegin(); it != python_path.rend(); ++it)
          sys_path.attr("insert")(0, *it);
        for (const auto& dir : python_path) addsitedir(dir);
      }
      auto cls = py::module_::import("runtime.generator").attr("Generator");
      return cls.attr("from_dir")(engine_dir, "backend"_a = backend, "device"_a = device,
                                  "low_memory"_a = low_memory);
    });
  }

  Generator(const Generator&) = delete;
  Generator& operator=(const Generator&) = delete;
  // Moving a py::object swaps a pointer and touches no reference count: no GIL needed.
  Generator(Generator&& other) noexcept = default;
  Generator& operator=(Generator&& other) noexcept {
    if (this != &other) {
      reset();
      gen_ = std::move(other.gen_);
    }
    return *this;
  }
  ~Generator() { reset(); }

  // The first image for `prompt` (one, unless `params.num_images` says more).
  Image generate(const std::string& prompt, const GeneratorParams& params = {}) {
    return generate_many(prompt, params).front();
  }

  // `params.num_images` images for `prompt` in one batch (at most the folder's batch size).
  std::vector<Image> generate_many(const std::string& prompt, const GeneratorParams& params) {
    namespace py = pybind11;
    using namespace py::literals;
    return detail::call_python([&] {
      py::object py_params = py::module_::import("runtime.params").attr("GeneratorParams")(
          "seed"_a = params.seed, "steps"_a = or_none(params.steps),
          "guidance"_a = or_none(params.guidance),
          "decoder_steps"_a = or_none(params.decoder_steps),
          "decoder_guidance"_a = or_none(params.decoder_guidance),
          "num_images"_a = params.num_images, "sampler"_a = or_none(params.sampler),
          "decoder_sampler"_a = or_none(params.decoder_sampler),
          "preset"_a = or_none(params.preset));
      py::object images = handle().attr("generate")(prompt, py_params);
      std::vector<Image> out;
      for (py::handle pil : images) out.push_back(to_image(pil));
      return out;
    });
  }

  // The answer to `question` about `image` (decoded text), sampled as `params` says (greedy
  // by default).
  std::string answer(const Image& image, const std::string& question,
                     const AnswerParams& params = {}) {
    namespace py = pybind11;
    using namespace py::literals;
    if (image.width < 0 || image.height < 0 ||
        image.rgb.size() != static_cast<std::size_t>(image.width) * image.height * 3)
      throw Error("Image of " + std::to_string(image.width) + "x" +
                  std::to_string(image.height) + " px needs width * height * 3 = " +
                  std::to_string(static_cast<long long>(image.width) * image.height * 3) +
                  " RGB bytes, got " + std::to_string(image.rgb.size()));
    return detail::call_python([&] {
      // (H, W, 3) uint8, copied from the caller's buffer: runtime.host.image.load_image
      // takes exactly this, and the copy frees the caller from any lifetime rule.
      py::array_t<std::uint8_t> pixels({image.height, image.width, 3}, image.rgb.data());
      py::object py_params = py::module_::import("runtime.params").attr("AnswerParams")(
          "max_new_tokens"_a = params.max_new_tokens, "temperature"_a = params.temperature,
          "top_p"_a = params.top_p, "seed"_a = params.seed);
      return handle().attr("answer")(pixels, question, py_params).cast<std::string>();
    });
  }

  // Kept for one release (0.4): a greedy answer of at most `max_new_tokens` tokens.
  [[deprecated("use answer(image, question, AnswerParams{...})")]]
  std::string answer(const Image& image, const std::string& question, int max_new_tokens) {
    AnswerParams params;
    params.max_new_tokens = max_new_tokens;
    return answer(image, question, params);
  }

  // Frees the sessions now (they also go with the Generator); later calls reopen them lazily.
  void close() {
    detail::call_python([&] { handle().attr("close")(); });
  }

 private:
  pybind11::object& handle() {
    if (!gen_) throw Error("blip3o::Generator was moved from");
    return gen_;
  }

  template <typename T>
  static pybind11::object or_none(const std::optional<T>& value) {
    return value ? pybind11::cast(*value) : pybind11::none();
  }

  static Image to_image(pybind11::handle pil) {
    pybind11::object rgb = pil.attr("convert")("RGB");
    Image image;
    image.width = rgb.attr("width").cast<int>();
    image.height = rgb.attr("height").cast<int>();
    // PIL's raw "RGB" encoding is exactly our layout: row-major, 3 bytes a pixel, no padding.
    pybind11::bytes raw = rgb.attr("tobytes")();
    std::string_view view = raw;
    image.rgb.assign(view.begin(), view.end());
    return image;
  }

  // Closes the sessions and drops the reference with the GIL held; a destructor must not throw,
  // and after the interpreter is gone (a host that finalized its own) the object is leaked.
  void reset() noexcept {
    if (!gen_) return;
    if (!Py_IsInitialized()) {
      (void)gen_.release();
      return;
    }
    pybind11::gil_scoped_acquire gil;
    try {
      gen_.attr("close")();
    } catch (pybind11::error_already_set& e) {
      e.discard_as_unraisable("blip3o::Generator::~Generator");
    } catch (...) {
    }
    gen_ = pybind11::object();
  }

  pybind11::object gen_;
};

}  // namespace blip3o
