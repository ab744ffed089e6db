// example ENGINE_DIR OUT.ppm "PROMPT" "QUESTION"
//
// Generates one image (seed 0, manifest defaults), writes it as a binary PPM (P6: no image
// library needed), answers QUESTION about it and prints the answer. On failure it prints the
// runtime's message and exits 1. BLIP3O_PYTHON_PATH (directories separated by ':') is passed to
// the Generator's `python_path`, an alternative to PYTHONPATH for finding the runtime.
#include <cstdio>
#include <cstdlib>
#include <exception>
#include <fstream>
#include <iostream>
#include <sstream>
#include <string>
#include <vector>

#include "blip3o.hpp"

namespace {

std::vector<std::string> split_path(const char* value) {
  std::vector<std::string> dirs;
  if (value == nullptr) return dirs;
  std::stringstream stream(value);
  for (std::string dir; std::getline(stream, dir, ':');)
    if (!dir.empty()) dirs.push_back(dir);
  return dirs;
}

void write_ppm(const std::string& path, const blip3o::Image& image) {
  std::ofstream out(path, std::ios::binary);
  out << "P6\n" << image.width << " " << image.height << "\n255\n";
  out.write(reinterpret_cast<const char*>(image.rgb.data()),
            static_cast<std::streamsize>(image.rgb.size()));
  if (!out) throw std::runtime_error("cannot write " + path);
}

}  // namespace

int main(int argc, char** argv) {
  if (argc != 5) {
    std::cerr << "usage: " << argv[0] << " ENGINE_DIR OUT.ppm PROMPT QUESTION\n";
    return 2;
  }
  try {
    blip3o::Generator gen(argv[1], "onnxruntime", "cpu",
                          split_path(std::getenv("BLIP3O_PYTHON_PATH")));
    blip3o::GeneratorParams params;
    params.seed = 0;
    blip3o::Image image = gen.generate(argv[3], params);
    write_ppm(argv[2], image);
    std::cout << gen.answer(image, argv[4]) << std::endl;
  } catch (const std::exception& e) {
    std::cerr << "error: " << e.what() << std::endl;
    return 1;
  }
  return 0;
}
