// spc_arm_runner: run an spc bundle's model.so with TVM's runtime (no Python), e.g. on AArch64 or under
// qemu-aarch64. Built by targets/arm_runtime.py against the aarch64 libtvm_runtime.so / libtvm_ffi.so of the
// apache-tvm / apache-tvm-ffi wheels of the version that compiled the bundle.
//
//   spc_arm_runner MODEL.so OUT_DIR [--repeat N] IN0.npy [IN1.npy ...]
//
// Inputs are .npy files (C order, little endian; float32/float64/int32/int64/int8/uint8/bool) in the order of the
// manifest's inputs; outputs are written as OUT_DIR/out0.npy, out1.npy, ... With --repeat N the entry function
// runs N more times and the mean wall time per run is printed ("time_ms: ..."). Threads: all cores unless
// TVM_NUM_THREADS is set (TVM's own default is half the hardware threads).
#include <dlpack/dlpack.h>
#include <tvm/ffi/any.h>
#include <tvm/ffi/container/array.h>
#include <tvm/ffi/container/tensor.h>
#include <tvm/ffi/extra/module.h>
#include <tvm/ffi/function.h>

#include <chrono>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <iostream>
#include <sstream>
#include <stdexcept>
#include <string>
#include <thread>
#include <vector>

namespace ffi = tvm::ffi;

namespace {

struct CPUAlloc {
  void AllocData(DLTensor* t) {
    size_t n = ffi::GetDataSize(*t);
    void* p = nullptr;
    if (posix_memalign(&p, 64, n == 0 ? 64 : n) != 0) throw std::runtime_error("out of memory");
    t->data = p;
  }
  void FreeData(DLTensor* t) { free(t->data); }
};

struct DType {
  const char* descr;
  DLDataType dl;
};

const DType kTypes[] = {
    {"<f4", {kDLFloat, 32, 1}}, {"<f8", {kDLFloat, 64, 1}}, {"<i4", {kDLInt, 32, 1}},
    {"<i8", {kDLInt, 64, 1}},   {"|i1", {kDLInt, 8, 1}},    {"|u1", {kDLUInt, 8, 1}},
    {"|b1", {kDLBool, 8, 1}},
};

std::string header_value(const std::string& header, const std::string& key) {
  size_t k = header.find("'" + key + "'");
  if (k == std::string::npos) throw std::runtime_error("npy header without " + key);
  size_t colon = header.find(':', k);
  size_t start = header.find_first_not_of(' ', colon + 1);
  if (header[start] == '\'') {
    size_t end = header.find('\'', start + 1);
    return header.substr(start + 1, end - start - 1);
  }
  if (header[start] == '(') {
    size_t end = header.find(')', start);
    return header.substr(start + 1, end - start - 1);
  }
  size_t end = header.find_first_of(",}", start);
  return header.substr(start, end - start);
}

ffi::Tensor read_npy(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) throw std::runtime_error("cannot open " + path);
  char magic[6];
  in.read(magic, 6);
  if (std::memcmp(magic, "\x93NUMPY", 6) != 0) throw std::runtime_error(path + " is not a .npy file");
  unsigned char version[2];
  in.read(reinterpret_cast<char*>(version), 2);
  uint32_t hlen = 0;
  if (version[0] == 1) {
    unsigned char b[2];
    in.read(reinterpret_cast<char*>(b), 2);
    hlen = b[0] | (b[1] << 8);
  } else {
    unsigned char b[4];
    in.read(reinterpret_cast<char*>(b), 4);
    hlen = b[0] | (b[1] << 8) | (b[2] << 16) | (static_cast<uint32_t>(b[3]) << 24);
  }
  std::string header(hlen, ' ');
  in.read(&header[0], hlen);
  std::string descr = header_value(header, "descr");
  if (header_value(header, "fortran_order") != "False") throw std::runtime_error(path + ": Fortran order");
  std::vector<int64_t> shape;
  std::stringstream ss(header_value(header, "shape"));
  std::string item;
  while (std::getline(ss, item, ',')) {
    if (item.find_first_not_of(' ') == std::string::npos) continue;
    shape.push_back(std::stoll(item));
  }
  const DType* dt = nullptr;
  for (const auto& t : kTypes)
    if (descr == t.descr) dt = &t;
  if (!dt) throw std::runtime_error(path + ": unsupported dtype " + descr);
  DLDevice cpu{kDLCPU, 0};
  ffi::Tensor t = ffi::Tensor::FromNDAlloc(CPUAlloc(), ffi::ShapeView(shape.data(), shape.size()), dt->dl, cpu);
  in.read(static_cast<char*>(t.data_ptr()), ffi::GetDataSize(t));
  if (!in) throw std::runtime_error(path + ": truncated data");
  return t;
}

void write_npy(const std::string& path, const ffi::Tensor& t) {
  const DLTensor* d = t.GetDLTensorPtr();
  const char* descr = nullptr;
  for (const auto& k : kTypes)
    if (k.dl.code == d->dtype.code && k.dl.bits == d->dtype.bits) descr = k.descr;
  if (!descr) throw std::runtime_error("unsupported output dtype");
  std::string shape;
  for (int i = 0; i < d->ndim; ++i) shape += std::to_string(d->shape[i]) + (d->ndim == 1 ? "," : (i + 1 < d->ndim ? ", " : ""));
  std::string header = "{'descr': '" + std::string(descr) + "', 'fortran_order': False, 'shape': (" + shape + "), }";
  size_t total = 10 + header.size() + 1;
  header += std::string((64 - total % 64) % 64, ' ') + "\n";
  std::ofstream out(path, std::ios::binary);
  out.write("\x93NUMPY\x01\x00", 8);
  uint16_t hlen = static_cast<uint16_t>(header.size());
  unsigned char b[2] = {static_cast<unsigned char>(hlen & 0xff), static_cast<unsigned char>(hlen >> 8)};
  out.write(reinterpret_cast<char*>(b), 2);
  out.write(header.data(), header.size());
  out.write(static_cast<const char*>(d->data), ffi::GetDataSize(*d));
  if (!out) throw std::runtime_error("cannot write " + path);
}

void collect(const ffi::Any& value, std::vector<ffi::Tensor>* outs) {
  if (auto t = value.as<ffi::Tensor>()) {
    outs->push_back(*t);
    return;
  }
  if (auto arr = value.as<ffi::Array<ffi::Any>>()) {
    for (const ffi::Any& item : *arr) collect(item, outs);
    return;
  }
  throw std::runtime_error("unexpected output type " + value.GetTypeKey());
}

}  // namespace

int main(int argc, char** argv) {
  if (argc < 3) {
    std::cerr << "usage: " << argv[0] << " MODEL.so OUT_DIR [--repeat N] IN0.npy [IN1.npy ...]\n";
    return 2;
  }
  if (!std::getenv("TVM_NUM_THREADS") && !std::getenv("OMP_NUM_THREADS")) {
    unsigned n = std::thread::hardware_concurrency();
    setenv("TVM_NUM_THREADS", std::to_string(n ? n : 1).c_str(), 1);
  }
  try {
    std::string model = argv[1], out_dir = argv[2];
    int repeat = 0, first = 3;
    if (argc > 4 && std::string(argv[3]) == "--repeat") {
      repeat = std::atoi(argv[4]);
      first = 5;
    }
    std::vector<ffi::Tensor> inputs;
    for (int i = first; i < argc; ++i) inputs.push_back(read_npy(argv[i]));

    ffi::Module lib = ffi::Module::LoadFromFile(model);
    ffi::Function load = lib->GetFunction("vm_load_executable", true).value();
    ffi::Module vm = load().cast<ffi::Module>();
    const int kPooled = 2;
    vm->GetFunction("vm_initialization", true).value()(static_cast<int>(kDLCPU), 0, kPooled);
    ffi::Function entry = vm->GetFunction("main", true).value();

    std::vector<ffi::AnyView> args(inputs.begin(), inputs.end());
    ffi::Any result;
    entry.CallPacked(args.data(), static_cast<int32_t>(args.size()), &result);
    if (repeat > 0) {
      auto t0 = std::chrono::steady_clock::now();
      for (int r = 0; r < repeat; ++r) entry.CallPacked(args.data(), static_cast<int32_t>(args.size()), &result);
      double ms = std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count();
      std::printf("time_ms: %.4f\n", ms / repeat);
    }
    std::vector<ffi::Tensor> outs;
    collect(result, &outs);
    for (size_t i = 0; i < outs.size(); ++i) write_npy(out_dir + "/out" + std::to_string(i) + ".npy", outs[i]);
    std::printf("outputs: %zu\n", outs.size());
  } catch (const std::exception& e) {
    std::cerr << "spc_arm_runner: " << e.what() << "\n";
    return 1;
  }
  return 0;
}
