// decode() on malformed payloads: each is kProtocolError, never a crash. The malformed buffers are
// built with FlatBuffers directly (the generated API), so every check is reached on its own.
#include <flatbuffers/flatbuffers.h>
#include <gtest/gtest.h>

#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <limits>
#include <optional>
#include <string>
#include <vector>

#include "protocol/companion_generated.h"
#include "protocol/limits.hpp"
#include "protocol/messages.hpp"

namespace companion::protocol {
namespace {

namespace fb = flatbuffers;
using Builder = fb::FlatBufferBuilder;

// ---- a Parameters message described field by field --------------------------------------------

struct TensorDesc {
  std::optional<std::string> name = "model.layers.0.mlp.up_proj.weight";
  uint8_t dtype = static_cast<uint8_t>(wire::DType::F32);
  std::optional<std::vector<int64_t>> shape = std::vector<int64_t>{2, 3};
  std::optional<std::vector<int64_t>> strides = std::vector<int64_t>{3, 1};
  uint32_t segment = 0;
  uint64_t offset = 0;
  uint64_t nbytes = 24;
};

struct SegmentDesc {
  uint8_t kind = static_cast<uint8_t>(wire::SegmentKind::HostMemfd);
  uint64_t size = 4096;
  std::optional<int32_t> fd_index = 0;  // nullopt: field absent (reads as the default, -1)
  std::optional<std::vector<uint8_t>> ipc_handle;
};

struct ParamsDesc {
  std::vector<SegmentDesc> segments{SegmentDesc{}};
  std::vector<TensorDesc> tensors{TensorDesc{}};
  bool with_model = true;
};

fb::Offset<wire::ModelStatus> put_status(Builder& b) {
  return wire::CreateModelStatusDirect(b, "key", "id", "source", wire::ModelState::Loaded);
}

std::vector<uint8_t> finish_message(Builder& b, wire::Body type, fb::Offset<void> body) {
  b.Finish(wire::CreateMessage(b, 77, type, body));
  return std::vector<uint8_t>(b.GetBufferPointer(), b.GetBufferPointer() + b.GetSize());
}

fb::Offset<wire::Tensor> put_tensor(Builder& b, const TensorDesc& t) {
  fb::Offset<fb::String> name;
  if (t.name) name = b.CreateString(*t.name);
  fb::Offset<fb::Vector<int64_t>> shape, strides;
  if (t.shape) shape = b.CreateVector(*t.shape);
  if (t.strides) strides = b.CreateVector(*t.strides);
  return wire::CreateTensor(b, name, static_cast<wire::DType>(t.dtype), shape, strides, t.segment,
                            t.offset, t.nbytes);
}

fb::Offset<wire::Segment> put_segment(Builder& b, const SegmentDesc& s) {
  fb::Offset<fb::Vector<uint8_t>> handle;
  if (s.ipc_handle) handle = b.CreateVector(*s.ipc_handle);
  wire::SegmentBuilder sb(b);
  sb.add_size(s.size);
  if (s.fd_index) sb.add_fd_index(*s.fd_index);
  sb.add_ipc_handle(handle);
  sb.add_kind(static_cast<wire::SegmentKind>(s.kind));
  return sb.Finish();
}

std::vector<uint8_t> build_parameters(const ParamsDesc& p) {
  Builder b;
  std::vector<fb::Offset<wire::Segment>> segs;
  for (const auto& s : p.segments) segs.push_back(put_segment(b, s));
  std::vector<fb::Offset<wire::Tensor>> ts;
  for (const auto& t : p.tensors) ts.push_back(put_tensor(b, t));
  fb::Offset<wire::ModelStatus> model;
  if (p.with_model) model = put_status(b);
  auto body = wire::CreateParameters(b, 5, model, b.CreateVector(segs), b.CreateVector(ts));
  return finish_message(b, wire::Body::Parameters, body.Union());
}

std::string describe(const Result<Message>& r) {
  if (r.ok()) return std::string("decoded as ") + body_name(r->body);
  return r.error().to_string();
}

::testing::AssertionResult is_protocol_error(std::vector<uint8_t> bytes) {
  auto r = decode(std::move(bytes));
  if (r.ok()) return ::testing::AssertionFailure() << "accepted: " << describe(r);
  if (r.error().code != StatusCode::kProtocolError)
    return ::testing::AssertionFailure() << "wrong code: " << describe(r);
  return ::testing::AssertionSuccess();
}

::testing::AssertionResult decodes(std::vector<uint8_t> bytes) {
  auto r = decode(std::move(bytes));
  if (!r.ok()) return ::testing::AssertionFailure() << describe(r);
  return ::testing::AssertionSuccess();
}

#define EXPECT_PROTOCOL_ERROR(expr) EXPECT_TRUE(is_protocol_error(expr))
#define EXPECT_DECODES(expr) EXPECT_TRUE(decodes(expr))

// ---- sanity: the baseline descriptions decode, so each rejection below is for its one change ----

TEST(CodecReject, BaselineParametersDecode) {
  auto r = decode(build_parameters(ParamsDesc{}));
  ASSERT_TRUE(r.ok()) << describe(r);
  const auto& p = std::get<Parameters>(r->body);
  ASSERT_EQ(p.tensors.size(), 1u);
  EXPECT_EQ(p.tensors[0].nbytes, 24u);

  ParamsDesc ipc;
  ipc.segments[0].kind = static_cast<uint8_t>(wire::SegmentKind::CudaIpcHandle);
  ipc.segments[0].fd_index = std::nullopt;
  ipc.segments[0].ipc_handle = std::vector<uint8_t>(64, 0xab);
  EXPECT_DECODES(build_parameters(ipc));

  ParamsDesc vmm;
  vmm.segments[0].kind = static_cast<uint8_t>(wire::SegmentKind::CudaVmmFd);
  vmm.segments[0].fd_index = kMaxFdsPerFrame - 1;
  EXPECT_DECODES(build_parameters(vmm));
}

TEST(CodecReject, EmptyPayload) {
  EXPECT_PROTOCOL_ERROR(std::vector<uint8_t>{});
  EXPECT_PROTOCOL_ERROR(std::vector<uint8_t>(1, 0));
  EXPECT_PROTOCOL_ERROR(std::vector<uint8_t>(4, 0));
  EXPECT_PROTOCOL_ERROR(std::vector<uint8_t>(64, 0));
}

TEST(CodecReject, MessageWithNoBodyType) {
  Builder b;
  b.Finish(wire::CreateMessage(b, 1, wire::Body::NONE, 0));
  EXPECT_PROTOCOL_ERROR(
      std::vector<uint8_t>(b.GetBufferPointer(), b.GetBufferPointer() + b.GetSize()));
}

TEST(CodecReject, UnknownBodyType) {
  Builder b;
  auto done = wire::CreateDone(b);
  b.Finish(wire::CreateMessage(b, 1, static_cast<wire::Body>(200), done.Union()));
  EXPECT_PROTOCOL_ERROR(
      std::vector<uint8_t>(b.GetBufferPointer(), b.GetBufferPointer() + b.GetSize()));
}

// A body type whose body table is absent passes the FlatBuffers verifier (a null table verifies),
// so decode must check for it. Run in a child: a null dereference must fail this test only.
TEST(CodecRejectDeathTest, MessageWithBodyTypeButNoBody) {
  GTEST_FLAG_SET(death_test_style, "threadsafe");
  auto check_all = [] {
    int bad = 0;
    for (int t = 1; t <= static_cast<int>(wire::Body::MAX); ++t) {
      Builder b;
      b.Finish(wire::CreateMessage(b, 1, static_cast<wire::Body>(t), 0));
      auto r =
          decode(std::vector<uint8_t>(b.GetBufferPointer(), b.GetBufferPointer() + b.GetSize()));
      bool is_request_without_fields = t == static_cast<int>(wire::Body::List) ||
                                       t == static_cast<int>(wire::Body::Health) ||
                                       t == static_cast<int>(wire::Body::Done);
      // Field-less bodies may be accepted; all others must be refused as malformed.
      if (r.ok() ? !is_request_without_fields : r.error().code != StatusCode::kProtocolError) {
        std::fprintf(stderr, "body type %s without a body: %s\n",
                     wire::EnumNameBody(static_cast<wire::Body>(t)), describe(r).c_str());
        ++bad;
      }
    }
    std::fflush(stderr);
    std::_Exit(bad == 0 ? 0 : 1);
  };
  EXPECT_EXIT(check_all(), ::testing::ExitedWithCode(0), "");
}

// ---- Parameters: tensors ----------------------------------------------------------------------

ParamsDesc with_tensor(const std::function<void(TensorDesc&)>& change) {
  ParamsDesc p;
  change(p.tensors[0]);
  return p;
}

TEST(CodecReject, TensorOutsideItsSegment) {
  EXPECT_PROTOCOL_ERROR(build_parameters(with_tensor([](TensorDesc& t) { t.offset = 4073; })));
  EXPECT_PROTOCOL_ERROR(build_parameters(with_tensor([](TensorDesc& t) { t.offset = 4097; })));
  EXPECT_PROTOCOL_ERROR(
      build_parameters(with_tensor([](TensorDesc& t) { t.offset = 1ull << 40; })));
  // offset + nbytes wraps around 2^64: must not pass as "inside".
  EXPECT_PROTOCOL_ERROR(build_parameters(
      with_tensor([](TensorDesc& t) { t.offset = std::numeric_limits<uint64_t>::max() - 7; })));
  // A tensor larger than its segment, at offset 0.
  EXPECT_PROTOCOL_ERROR(build_parameters(with_tensor([](TensorDesc& t) {
    t.shape = std::vector<int64_t>{1025};
    t.strides = std::vector<int64_t>{1};
    t.nbytes = 4100;
  })));
  // Boundaries that are fine: ends exactly at the segment's end; zero bytes at its very end.
  EXPECT_DECODES(build_parameters(with_tensor([](TensorDesc& t) { t.offset = 4072; })));
  EXPECT_DECODES(build_parameters(with_tensor([](TensorDesc& t) {
    t.shape = std::vector<int64_t>{0, 3};
    t.nbytes = 0;
    t.offset = 4096;
  })));
}

TEST(CodecReject, TensorNamesAMissingSegment) {
  EXPECT_PROTOCOL_ERROR(build_parameters(with_tensor([](TensorDesc& t) { t.segment = 1; })));
  EXPECT_PROTOCOL_ERROR(build_parameters(
      with_tensor([](TensorDesc& t) { t.segment = std::numeric_limits<uint32_t>::max(); })));
}

TEST(CodecReject, NbytesInconsistentWithShapeAndDtype) {
  EXPECT_PROTOCOL_ERROR(build_parameters(with_tensor([](TensorDesc& t) { t.nbytes = 23; })));
  EXPECT_PROTOCOL_ERROR(build_parameters(with_tensor([](TensorDesc& t) { t.nbytes = 25; })));
  EXPECT_PROTOCOL_ERROR(build_parameters(with_tensor([](TensorDesc& t) { t.nbytes = 0; })));
  EXPECT_PROTOCOL_ERROR(build_parameters(with_tensor([](TensorDesc& t) {
    t.dtype = static_cast<uint8_t>(wire::DType::BF16);  // 12 bytes, not 24
  })));
  // Rank 0 is one element.
  EXPECT_PROTOCOL_ERROR(build_parameters(with_tensor([](TensorDesc& t) {
    t.shape = std::nullopt;
    t.strides = std::nullopt;
    t.nbytes = 0;
  })));
  EXPECT_DECODES(build_parameters(with_tensor([](TensorDesc& t) {
    t.shape = std::nullopt;
    t.strides = std::nullopt;
    t.nbytes = 4;
  })));
  // Element count overflowing 64 bits, and elements x dtype size overflowing.
  EXPECT_PROTOCOL_ERROR(build_parameters(with_tensor([](TensorDesc& t) {
    t.shape = std::vector<int64_t>{int64_t{1} << 40, int64_t{1} << 40};
    t.nbytes = 0;
  })));
  EXPECT_PROTOCOL_ERROR(build_parameters(with_tensor([](TensorDesc& t) {
    t.shape = std::vector<int64_t>{int64_t{1} << 62, 2};  // 2^63 elements x 4 bytes wraps to 0
    t.nbytes = 0;
  })));
  EXPECT_PROTOCOL_ERROR(build_parameters(with_tensor([](TensorDesc& t) {
    t.shape = std::vector<int64_t>{int64_t{1} << 62, 4};  // 2^64 elements wraps to 0
    t.dtype = static_cast<uint8_t>(wire::DType::U8);
    t.nbytes = 0;
  })));
}

TEST(CodecReject, NegativeDims) {
  // The product is positive and matches nbytes: only the sign check catches these.
  EXPECT_PROTOCOL_ERROR(build_parameters(with_tensor([](TensorDesc& t) {
    t.shape = std::vector<int64_t>{-2, -3};
  })));
  EXPECT_PROTOCOL_ERROR(build_parameters(with_tensor([](TensorDesc& t) {
    t.shape = std::vector<int64_t>{-1, 6};
  })));
  EXPECT_PROTOCOL_ERROR(build_parameters(with_tensor([](TensorDesc& t) {
    t.shape = std::vector<int64_t>{std::numeric_limits<int64_t>::min(), 0};
    t.nbytes = 0;
  })));
}

TEST(CodecReject, StridesLengthDiffersFromShape) {
  EXPECT_PROTOCOL_ERROR(
      build_parameters(with_tensor([](TensorDesc& t) { t.strides = std::vector<int64_t>{1}; })));
  EXPECT_PROTOCOL_ERROR(build_parameters(with_tensor([](TensorDesc& t) {
    t.strides = std::vector<int64_t>{6, 3, 1};
  })));
  EXPECT_PROTOCOL_ERROR(
      build_parameters(with_tensor([](TensorDesc& t) { t.strides = std::nullopt; })));
  EXPECT_PROTOCOL_ERROR(build_parameters(with_tensor([](TensorDesc& t) {
    t.shape = std::nullopt;  // rank 0 with strides
    t.nbytes = 4;
  })));
}

TEST(CodecReject, RankAboveLimit) {
  auto rank = [](size_t n) {
    return with_tensor([n](TensorDesc& t) {
      t.shape = std::vector<int64_t>(n, 1);
      t.strides = std::vector<int64_t>(n, 1);
      t.nbytes = 4;
    });
  };
  EXPECT_DECODES(build_parameters(rank(kMaxRank)));
  EXPECT_PROTOCOL_ERROR(build_parameters(rank(kMaxRank + 1)));
  EXPECT_PROTOCOL_ERROR(build_parameters(rank(1000)));
}

TEST(CodecReject, BadTensorNames) {
  EXPECT_PROTOCOL_ERROR(build_parameters(with_tensor([](TensorDesc& t) { t.name = ""; })));
  EXPECT_PROTOCOL_ERROR(
      build_parameters(with_tensor([](TensorDesc& t) { t.name = std::nullopt; })));
  EXPECT_PROTOCOL_ERROR(build_parameters(
      with_tensor([](TensorDesc& t) { t.name = std::string(kMaxNameBytes + 1, 'x'); })));
  EXPECT_DECODES(build_parameters(
      with_tensor([](TensorDesc& t) { t.name = std::string(kMaxNameBytes, 'x'); })));
}

TEST(CodecReject, UnknownDtype) {
  for (int d : {kDTypeCount, kDTypeCount + 1, 127, 128, 255}) {
    EXPECT_PROTOCOL_ERROR(build_parameters(with_tensor([d](TensorDesc& t) {
      t.dtype = static_cast<uint8_t>(d);
      t.nbytes = 6;  // one byte per element would make it consistent for a 1-byte type
    }))) << d;
  }
  // Also in a ModelSpec.
  Builder b;
  auto spec = wire::CreateModelSpecDirect(b, "/m", "", true, static_cast<wire::DType>(kDTypeCount));
  auto body = wire::CreateGetParameters(b, spec, true);
  EXPECT_PROTOCOL_ERROR(finish_message(b, wire::Body::GetParameters, body.Union()));
}

// ---- Parameters: segments ---------------------------------------------------------------------

TEST(CodecReject, UnknownSegmentKind) {
  for (int k : {3, 4, 127, 255}) {
    ParamsDesc p;
    p.segments[0].kind = static_cast<uint8_t>(k);
    p.segments[0].ipc_handle = std::vector<uint8_t>(64, 1);
    EXPECT_PROTOCOL_ERROR(build_parameters(p)) << k;
  }
}

TEST(CodecReject, IpcSegmentWithoutA64ByteHandle) {
  for (std::optional<size_t> n :
       {std::optional<size_t>(), std::optional<size_t>(0), std::optional<size_t>(63),
        std::optional<size_t>(65), std::optional<size_t>(128)}) {
    ParamsDesc p;
    p.segments[0].kind = static_cast<uint8_t>(wire::SegmentKind::CudaIpcHandle);
    p.segments[0].fd_index = std::nullopt;
    if (n) p.segments[0].ipc_handle = std::vector<uint8_t>(*n, 7);
    EXPECT_PROTOCOL_ERROR(build_parameters(p)) << (n ? std::to_string(*n) : "absent");
  }
}

TEST(CodecReject, FdSegmentWithoutFdIndex) {
  for (auto kind : {wire::SegmentKind::HostMemfd, wire::SegmentKind::CudaVmmFd}) {
    for (std::optional<int32_t> index :
         {std::optional<int32_t>(), std::optional<int32_t>(-1), std::optional<int32_t>(-7),
          std::optional<int32_t>(kMaxFdsPerFrame), std::optional<int32_t>(1 << 30)}) {
      ParamsDesc p;
      p.segments[0].kind = static_cast<uint8_t>(kind);
      p.segments[0].fd_index = index;
      EXPECT_PROTOCOL_ERROR(build_parameters(p))
          << wire::EnumNameSegmentKind(kind) << " fd_index " << (index ? *index : -999);
    }
  }
}

TEST(CodecReject, TooManySegments) {
  ParamsDesc p;
  p.segments.assign(kMaxSegments + 1, SegmentDesc{});
  EXPECT_PROTOCOL_ERROR(build_parameters(p));
  p.segments.assign(kMaxSegments, SegmentDesc{});
  EXPECT_DECODES(build_parameters(p));
}

TEST(CodecReject, ParametersWithoutModelStatus) {
  ParamsDesc p;
  p.with_model = false;
  EXPECT_PROTOCOL_ERROR(build_parameters(p));
}

// The tensor vector may name one table many times: a small buffer announcing many tensors.
std::vector<uint8_t> many_tensors(size_t count) {
  Builder b;
  auto seg = put_segment(b, SegmentDesc{});
  auto tensor = put_tensor(b, TensorDesc{});
  std::vector<fb::Offset<wire::Tensor>> ts(count, tensor);
  std::vector<fb::Offset<wire::Segment>> segs{seg};
  auto body = wire::CreateParameters(b, 5, put_status(b), b.CreateVector(segs), b.CreateVector(ts));
  return finish_message(b, wire::Body::Parameters, body.Union());
}

TEST(CodecReject, TooManyTensors) {
  EXPECT_PROTOCOL_ERROR(many_tensors(kMaxTensors + 1));
  auto ok = decode(many_tensors(kMaxTensors));
  ASSERT_TRUE(ok.ok()) << describe(ok);
  EXPECT_EQ(std::get<Parameters>(ok->body).tensors.size(), kMaxTensors);
}

// FlatBuffers' verifier checks a vector's length prefix for 4-byte alignment only, not its 8-byte
// elements. decode() hands out std::span<const int64_t> views of shape/strides: it must refuse a
// vector whose elements are misaligned (reading them is undefined behaviour, UBSan aborts) or
// must not hand out such views. Built here with a raw-byte vector placed 4 bytes off.
std::vector<uint8_t> misaligned_shape(size_t pad) {
  Builder b;
  auto seg = put_segment(b, SegmentDesc{});
  auto name = b.CreateString("w");
  auto strides = b.CreateVector(std::vector<int64_t>{3, 1});
  const int64_t dims[2] = {2, 3};
  b.Pad(pad);
  b.StartVector(sizeof(dims), 1);
  b.PushBytes(reinterpret_cast<const uint8_t*>(dims), sizeof(dims));
  fb::Offset<fb::Vector<int64_t>> shape(b.EndVector(2));
  auto tensor = wire::CreateTensor(b, name, wire::DType::F32, shape, strides, 0, 0, 24);
  std::vector<fb::Offset<wire::Segment>> segs{seg};
  std::vector<fb::Offset<wire::Tensor>> ts{tensor};
  auto body = wire::CreateParameters(b, 5, put_status(b), b.CreateVector(segs), b.CreateVector(ts));
  return finish_message(b, wire::Body::Parameters, body.Union());
}

TEST(CodecRejectDeathTest, MisalignedShapeVector) {
  GTEST_FLAG_SET(death_test_style, "threadsafe");
  std::vector<uint8_t> bytes;
  for (size_t pad : {0, 4}) {
    bytes = misaligned_shape(pad);
    const auto* m = wire::GetMessage(bytes.data());
    const auto* shape = m->body_as_Parameters()->tensors()->Get(0)->shape();
    if (reinterpret_cast<uintptr_t>(shape->data()) % alignof(int64_t) != 0) break;
    bytes.clear();
  }
  ASSERT_FALSE(bytes.empty()) << "could not build a misaligned shape vector";
  auto check = [&bytes] {
    auto r = decode(bytes);
    bool fine = true;
    if (r.ok()) {
      const auto& p = std::get<Parameters>(r->body);
      for (const auto& t : p.tensors)
        if (reinterpret_cast<uintptr_t>(t.shape.data()) % alignof(int64_t) != 0 ||
            reinterpret_cast<uintptr_t>(t.strides.data()) % alignof(int64_t) != 0)
          fine = false;
    } else {
      fine = r.error().code == StatusCode::kProtocolError;
    }
    if (!fine)
      std::fprintf(stderr, "misaligned int64 vector handed out: %s\n", describe(r).c_str());
    std::fflush(stderr);
    std::_Exit(fine ? 0 : 1);
  };
  EXPECT_EXIT(check(), ::testing::ExitedWithCode(0), "");
}

// ---- strings and other limits ------------------------------------------------------------------

TEST(CodecReject, StringsOverTheLimit) {
  const std::string max(kMaxStringBytes, 's');
  const std::string over(kMaxStringBytes + 1, 's');
  struct Case {
    const char* field;
    std::function<Message(const std::string&)> make;
  };
  auto spec_msg = [](int which) {
    return [which](const std::string& s) {
      ModelSpec spec;
      spec.source = "/m";
      (which == 0 ? spec.source : which == 1 ? spec.revision : spec.tag) = s;
      return Message{1, GetParameters{spec, true}};
    };
  };
  auto status_msg = [](std::string ModelStatus::*field) {
    return [field](const std::string& s) {
      ModelStatus st;
      st.*field = s;
      return Message{1, StatusEvent{st}};
    };
  };
  auto identity_msg = [](std::string ServerIdentity::*field) {
    return [field](const std::string& s) {
      ServerIdentity id;
      id.*field = s;
      return Message{1, HelloReply{1, 0, id}};
    };
  };
  std::vector<Case> cases = {
      {"Hello.client_name",
       [](const std::string& s) {
         return Message{1, Hello{1, 0, s, 1}};
       }},
      {"ModelSpec.source", spec_msg(0)},
      {"ModelSpec.revision", spec_msg(1)},
      {"ModelSpec.tag", spec_msg(2)},
      {"ModelStatus.key", status_msg(&ModelStatus::key)},
      {"ModelStatus.id", status_msg(&ModelStatus::id)},
      {"ModelStatus.source", status_msg(&ModelStatus::source)},
      {"ModelStatus.message", status_msg(&ModelStatus::message)},
      {"ModelStatus.backend", status_msg(&ModelStatus::backend)},
      {"ServerIdentity.instance_id", identity_msg(&ServerIdentity::instance_id)},
      {"ServerIdentity.ns", identity_msg(&ServerIdentity::ns)},
      {"ServerIdentity.component", identity_msg(&ServerIdentity::component)},
      {"ServerIdentity.hostname", identity_msg(&ServerIdentity::hostname)},
      {"ServerIdentity.device", identity_msg(&ServerIdentity::device)},
      {"ServerIdentity.gpu_uuid", identity_msg(&ServerIdentity::gpu_uuid)},
      {"ServerIdentity.pci_bus_id", identity_msg(&ServerIdentity::pci_bus_id)},
      {"ServerIdentity.default_backend", identity_msg(&ServerIdentity::default_backend)},
      {"ServerIdentity.version", identity_msg(&ServerIdentity::version)},
      {"ServerIdentity.socket_path", identity_msg(&ServerIdentity::socket_path)},
      {"ServerIdentity.backends[]",
       [](const std::string& s) {
         ServerIdentity id;
         id.backends = {"host", s};
         return Message{1, HelloReply{1, 0, id}};
       }},
      {"Unload.key",
       [](const std::string& s) {
         Unload u;
         u.key = s;
         return Message{1, u};
       }},
      {"HealthReply.state",
       [](const std::string& s) {
         HealthReply h;
         h.info.state = s;
         return Message{1, h};
       }},
      {"HealthReply.server.hostname",
       [](const std::string& s) {
         HealthReply h;
         h.info.server.hostname = s;
         return Message{1, h};
       }},
      {"ErrorReply.message",
       [](const std::string& s) {
         return Message{1, ErrorReply{Error{StatusCode::kInternal, s}}};
       }},
      {"ListReply.models[].message",
       [](const std::string& s) {
         ListReply l;
         l.models.resize(2);
         l.models[1].message = s;
         return Message{1, l};
       }},
  };
  for (const auto& c : cases) {
    SCOPED_TRACE(c.field);
    EXPECT_DECODES(encode(c.make(max)).value());
    EXPECT_PROTOCOL_ERROR(encode(c.make(over)).value());
  }
  // Parameters' model status goes through the same check.
  ModelStatus st;
  st.message = over;
  std::vector<SegmentInfo> segs(1);
  segs[0].size = 4096;
  segs[0].fd_index = 0;
  EXPECT_PROTOCOL_ERROR(encode_parameters(1, 1, st, segs, {}).value());
}

TEST(CodecReject, TooManyBackends) {
  ServerIdentity id;
  id.backends.assign(17, "host");
  EXPECT_PROTOCOL_ERROR(encode(Message{1, HelloReply{1, 0, id}}).value());
  id.backends.assign(16, "host");
  EXPECT_DECODES(encode(Message{1, HelloReply{1, 0, id}}).value());
}

TEST(CodecReject, TooManyModels) {
  auto list = [](size_t count) {
    Builder b;
    auto one = put_status(b);
    std::vector<fb::Offset<wire::ModelStatus>> models(count, one);
    auto body = wire::CreateListReply(b, b.CreateVector(models));
    return finish_message(b, wire::Body::ListReply, body.Union());
  };
  EXPECT_PROTOCOL_ERROR(list(kMaxModels + 1));
  EXPECT_DECODES(list(kMaxModels));
}

TEST(CodecReject, UnknownModelState) {
  Builder b;
  auto st = wire::CreateModelStatusDirect(b, "k", "i", "s", static_cast<wire::ModelState>(5));
  auto body = wire::CreateStatusEvent(b, st);
  EXPECT_PROTOCOL_ERROR(finish_message(b, wire::Body::StatusEvent, body.Union()));
}

TEST(CodecReject, RequiredSubtablesMissing) {
  {
    Builder b;
    auto body = wire::CreateGetParameters(b, 0, true);
    EXPECT_PROTOCOL_ERROR(finish_message(b, wire::Body::GetParameters, body.Union()));
  }
  {
    Builder b;
    auto body = wire::CreateLoad(b, 0, true);
    EXPECT_PROTOCOL_ERROR(finish_message(b, wire::Body::Load, body.Union()));
  }
  {
    Builder b;
    auto body = wire::CreateStatusSubscribe(b, 0, false);
    EXPECT_PROTOCOL_ERROR(finish_message(b, wire::Body::StatusSubscribe, body.Union()));
  }
  {
    Builder b;
    auto body = wire::CreateUnload(b, 0, 0, true);  // neither spec nor key
    EXPECT_PROTOCOL_ERROR(finish_message(b, wire::Body::Unload, body.Union()));
  }
  {
    Builder b;
    auto body = wire::CreateHelloReply(b, 1, 0, 0);
    EXPECT_PROTOCOL_ERROR(finish_message(b, wire::Body::HelloReply, body.Union()));
  }
  {
    Builder b;
    auto body = wire::CreateHealthReply(b, 0, 1, 1, 1, 1, 1, 1, 0);
    EXPECT_PROTOCOL_ERROR(finish_message(b, wire::Body::HealthReply, body.Union()));
  }
  {
    Builder b;
    auto body = wire::CreateStatusEvent(b, 0);
    EXPECT_PROTOCOL_ERROR(finish_message(b, wire::Body::StatusEvent, body.Union()));
  }
  {
    Builder b;
    auto body = wire::CreateLoadReply(b, 0);
    EXPECT_PROTOCOL_ERROR(finish_message(b, wire::Body::LoadReply, body.Union()));
  }
  {
    Builder b;
    auto body = wire::CreateUnloadReply(b, 0);
    EXPECT_PROTOCOL_ERROR(finish_message(b, wire::Body::UnloadReply, body.Union()));
  }
}

// A string that is not NUL-terminated, or an offset past the end, fails verification.
TEST(CodecReject, VerifierCatchesBrokenStructure) {
  std::vector<uint8_t> good = encode(Message{1, Hello{1, 0, "client", 1}}).value();
  ASSERT_TRUE(decode(good).ok());
  // Root offset pointing past the end.
  std::vector<uint8_t> bad = good;
  bad[0] = 0xff;
  bad[1] = 0xff;
  EXPECT_PROTOCOL_ERROR(bad);
  // The string's terminating NUL replaced.
  bad = good;
  for (size_t i = 0; i + 6 < bad.size(); ++i) {
    if (std::memcmp(bad.data() + i, "client", 6) == 0) {
      bad[i + 6] = 'x';
      break;
    }
  }
  EXPECT_PROTOCOL_ERROR(bad);
}

}  // namespace
}  // namespace companion::protocol
