/// \file linalg/matrix.hpp
/// \brief The Eigen matrix type kvpack's host code holds token × channel data in.
#pragma once

#include <Eigen/Core>

namespace kvpack {

/// Row-major fp32 matrix [tokens, channels]: how the caches hold token × channel data.
using RowMajorMatrixXf = Eigen::Matrix<float, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;

}  // namespace kvpack
